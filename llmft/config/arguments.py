"""`key=value` command-line arguments into a dataclass, strictly: what `llmft.eval`, `chat` and `export` take, and
how `eval.overrides` are checked at launch. (Hydra composes `llmft.launch`'s overrides; these commands read a run
directory instead of composing `conf/`, so they parse their few keys with OmegaConf directly.)
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import OmegaConf

from llmft.errors import UserError


class UsageError(UserError):
    """A mistake on the command line (an unknown key, a bad value, a missing argument)."""


def parse_arguments(argv: list[str], schema: Any, usage: str, prefix: str = "") -> Any:
    """`key=value` arguments into `schema` (a dataclass, or an instance holding the starting values), strictly.

    Values are given as text and converted by OmegaConf against the field's type (`64` -> int, `true` -> bool);
    text fields keep the value as typed (`prompt=My job: pending` stays a string). `null` or nothing after `=`
    sets an optional field to None. An unknown key or a bad value raises UsageError naming it (with `prefix`, as the
    user wrote it: `eval.max_new_tokens`).
    """
    conf = OmegaConf.structured(schema)
    for argument in argv:
        key, sep, value = argument.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise UsageError(f"argument {prefix}{argument!r} is not key=value ({usage}).")
        try:
            OmegaConf.update(conf, key, None if value.strip().lower() in ("", "null") else value, merge=True)
        except Exception as error:  # OmegaConf's ConfigKeyError / ValidationError: first line names the problem
            reason = str(error).strip().splitlines()[0]
            valid = ", ".join(prefix + k for k in valid_keys(schema))
            raise UsageError(f"bad argument {prefix}{key}: {reason} (valid keys: {valid}).") from None
    return OmegaConf.to_object(conf)


def valid_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for item in fields(schema):
        default = item.default_factory() if callable(item.default_factory) else item.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += valid_keys(type(default), f"{prefix}{item.name}.")
        else:
            keys.append(prefix + item.name)
    return keys
