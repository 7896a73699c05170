"""python -m llmft.export: export a run's adapter or merged model (the work is in llmft.serve.export)."""

import sys

from llmft.serve.export import main

if __name__ == "__main__":
    sys.exit(main())
