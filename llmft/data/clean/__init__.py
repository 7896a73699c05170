"""Cleaning: what the model should read, and only that. messages.py cleans each message (quoted replies, signatures,
whitespace) and shapes the turns for a chat template; html_text.py turns HTML bodies into text; scrub.py replaces
personal data and secrets with typed placeholders; dedup.py drops exact and near-duplicate conversations."""
