"""Secrets never reach the run directory, the logs or the resolved config.

A config key or command-line override named like a secret (key, token, password, secret, credential) has its
value replaced before anything is written. Environment variables (HF_TOKEN, WANDB_API_KEY...) are never written
at all: llmft records the config, not the environment.
"""

from __future__ import annotations

import re
from typing import Any

# A name ending in one of these words (hf_token, judge_api_key, password), not one merely containing it
# (max_new_tokens is no secret).
SECRET_NAME = re.compile(r"(^|[_.-])(api[_-]?key|key|token|passw(or)?d|secret|credentials?|private[_-]?key)$",
                         re.IGNORECASE)
REDACTED = "<redacted>"


# Tokenizer tokens are settings, not credentials.
NOT_SECRET = re.compile(r"(end_of_turn|eos|bos|pad|unk|sep|cls|mask)_token$", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and not NOT_SECRET.search(name)


def redact_config(value: Any, name: str = "") -> Any:
    """A copy of a plain config (dicts, lists, scalars) with the values of secret-named keys replaced."""
    if isinstance(value, dict):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):  # lists of `key=value` overrides (eval.overrides) are redacted item by item
        if all(isinstance(v, str) for v in value):
            return redact_argv([str(v) for v in value])
        return [redact_config(v, name) for v in value]
    if value is not None and is_secret_name(name) and not isinstance(value, bool):
        return REDACTED
    return value


# `name=value` inside a list override: eval.overrides=['eval.limit=2','eval.judge_api_key=sk-...']
_INNER_ASSIGNMENT = re.compile(r"(?P<name>[\w.+~-]+)=(?P<value>[^,'\"\]\[]*)")


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line overrides `some.api_key=VALUE` with the value replaced, also inside list values."""
    redacted = []
    for argument in argv:
        key, sep, value = argument.partition("=")
        if sep and is_secret_name(key.rsplit(".", 1)[-1]):
            redacted.append(f"{key}={REDACTED}")
            continue
        if sep and "=" in value:
            value = _INNER_ASSIGNMENT.sub(
                lambda m: f"{m['name']}={REDACTED}" if is_secret_name(m["name"].rsplit(".", 1)[-1]) else m[0], value)
        redacted.append(f"{key}{sep}{value}")
    return redacted
