"""python -m llmft.eval: evaluate a run's model and its base on held-out data (the work is in llmft.serve.eval_command)."""

import sys

from llmft.serve.eval_command import main

if __name__ == "__main__":
    sys.exit(main())
