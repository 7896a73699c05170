"""python -m llmft.launch [overrides]: see llmft/launch/command.py."""

import sys

from llmft.launch.command import main

if __name__ == "__main__":
    sys.exit(main())
