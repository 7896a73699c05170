"""python -m llmft.train: train from a run directory (one process per rank) (the work is in llmft.training.loop)."""

import sys

from llmft.errors import closed_pipe_ends_quietly
from llmft.training.loop import main

if __name__ == "__main__":
    sys.exit(closed_pipe_ends_quietly(main))  # `--help | head` ends quietly
