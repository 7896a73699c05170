"""python -m llmft.train: train from a run directory (one process per rank) (the work is in llmft.training.loop)."""

import sys

from llmft.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
