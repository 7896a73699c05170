"""python -m llmft.export: export a run's adapter, merged model or GGUF file, and share it on the Hub (the work is in
llmft.serve.export)."""

import sys

from llmft.serve.export import main

if __name__ == "__main__":
    sys.exit(main())
