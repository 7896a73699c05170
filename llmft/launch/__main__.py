"""python -m llmft.launch [overrides]: see llmft/launch/command.py."""

import sys

from llmft.training import signals  # torch-free: stop signals recorded before the imports of the launch (a second)

if __name__ == "__main__":
    with signals.recording(signals.LAUNCHER_SIGNALS):
        from llmft.launch.command import main

        sys.exit(main())
