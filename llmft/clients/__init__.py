"""Clients of the services llmft talks to over the network: an OpenAI-compatible chat endpoint (the LLM that writes
acronym conversations, the judge of `llmft eval`). Standard library only: the login node runs them without torch."""
