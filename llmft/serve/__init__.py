"""After training: use a finished run. `inference` (load a run's model and tokenizer, render prompts, generate),
`evaluation` (held-out answers scored against references, an LLM judge), `chat` and `export`. Reads run directories
written by `llmft.training`; the commands check their arguments before importing torch."""
