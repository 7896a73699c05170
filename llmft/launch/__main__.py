"""python -m llmft.launch [overrides]: see llmft/launch/command.py."""

from llmft.launch.command import main

if __name__ == "__main__":
    main()
