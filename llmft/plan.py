"""python -m llmft.plan: show a job's resources, memory estimate and sbatch script without submitting (the work is in llmft.launch.plan)."""

import sys

from llmft.launch.plan import main

if __name__ == "__main__":
    sys.exit(main())
