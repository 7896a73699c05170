"""python -m llmft.runs: list runs and their status; `runs show RUN` for one (the work is in llmft.launch.runs)."""

import sys

from llmft.launch.runs import main

if __name__ == "__main__":
    sys.exit(main())
