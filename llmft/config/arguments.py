"""`key=value` command-line arguments into a dataclass, strictly: what `llmft.eval`, `chat` and `export` take, and
how `eval.overrides` are checked at launch. (Hydra composes `llmft.launch`'s overrides; these commands read a run
directory instead of composing `conf/`, so they parse their few keys with OmegaConf directly.)
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import ListConfig, OmegaConf

from llmft.errors import UserError


class UsageError(UserError):
    """A mistake on the command line (an unknown key, a bad value, a missing argument)."""


def parse_arguments(argv: list[str], schema: Any, usage: str, prefix: str = "") -> Any:
    """`key=value` arguments into `schema` (a dataclass, or an instance holding the starting values), strictly.

    Values are given as text and converted by OmegaConf against the field's type (`64` -> int, `true` -> bool);
    text fields keep the value as typed (`prompt=My job: pending` stays a string). `null` or nothing after `=`
    sets an optional field to None. A list field takes `[a,b]`, one value or a comma list. An unknown key or a bad
    value raises UsageError naming it (with `prefix`, as the user wrote it: `eval.max_new_tokens`), with the key it
    may have meant.
    """
    conf = OmegaConf.structured(schema)
    for argument in argv:
        key, sep, value = argument.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise UsageError(f"argument {prefix}{argument!r} is not key=value ({usage}).")
        given: Any = None if value.strip().lower() in ("", "null") else value
        if given is not None and isinstance(OmegaConf.select(conf, key, default=None), ListConfig):
            given = list_value(value)
        try:
            OmegaConf.update(conf, key, given, merge=True)
        except Exception as error:  # OmegaConf's ConfigKeyError / ValidationError: first line names the problem
            reason = str(error).strip().splitlines()[0]
            keys = [prefix + k for k in valid_keys(schema)]
            hint = close_argument(prefix + key, keys)
            raise UsageError(f"bad argument {prefix}{key}: {reason} ("
                             + (f"did you mean {hint}? " if hint else "") + f"valid keys: {', '.join(keys)}).") \
                from None
    return OmegaConf.to_object(conf)


def list_value(text: str) -> list[str]:
    """`[a, b]`, `a,b` or `a` as a list of texts."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [item.strip().strip("'\"") for item in text.split(",") if item.strip()]


# What other tools call these commands' keys (llmft.eval, chat, export).
OTHER_NAMES = {"max_tokens": "max_new_tokens", "max_length": "max_new_tokens", "n_samples": "limit",
               "num_samples": "limit", "output": "out", "output_dir": "out", "outdir": "out", "run_dir": "run",
               "quantization": "gguf.dtype", "quant": "gguf.dtype", "quantize": "gguf.dtype", "repo_id": "push",
               "hub_model_id": "push", "system_prompt": "system", "adapter_path": "run", "model": "run or base"}


def close_argument(key: str, keys: list[str]) -> str | None:
    """The valid key `key` may have meant: its name in other tools, the same name in another group, or the closest
    spelling."""
    import difflib

    prefix, _, leaf = key.rpartition(".")
    if leaf in OTHER_NAMES:
        named = OTHER_NAMES[leaf]
        return f"{prefix}.{named}" if prefix and f"{prefix}.{named}" in keys else named
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return " or ".join(same_leaf)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.7)
    return close[0] if close else None


def valid_keys(schema: Any, prefix: str = "") -> list[str]:
    keys = []
    for item in fields(schema):
        default = item.default_factory() if callable(item.default_factory) else item.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += valid_keys(type(default), f"{prefix}{item.name}.")
        else:
            keys.append(prefix + item.name)
    return keys
