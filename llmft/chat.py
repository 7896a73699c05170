"""python -m llmft.chat: chat with a run's model (the work is in llmft.serve.chat)."""

import sys

from llmft.serve.chat import main

if __name__ == "__main__":
    sys.exit(main())
