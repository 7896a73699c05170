"""Composition: `conf/` + command-line overrides -> a typed `LlmftConfig`, or one sentence saying what is wrong.

`llmft.launch` composes through `@hydra.main` (for `--cfg job`, `-m` and the sweeper plugins); `plan`, `runs` and
`data` compose through Hydra's compose API with `compose()`. Both turn Hydra's multi-line errors into one line
with `one_line_error`. Whatever its source (composition, a run directory's config.yaml read by
`llmft.rundir.files.read_config`), a config is typed by the schema in one place, `typed_config`: enums are enums after
it, and every key the schema defaults is there.

The config groups live in the source tree's top-level `conf/`, which a wheel installs as package data under
`llmft/conf/` (setup.py), so an installed copy finds them anywhere. No torch here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llmft.config import data_schema, schema
from llmft.config.known_models import model_folder
from llmft.config.schema import LlmftConfig
from llmft.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
# an installed wheel: llmft/conf/; a source tree (editable install, or the checkout on the path): its conf/
CONF_DIR = PACKAGE_DIR / "conf" if (PACKAGE_DIR / "conf").is_dir() else PACKAGE_DIR.parent / "conf"
SAMPLES_DIR = PACKAGE_DIR / "data" / "samples"
# The dataclasses of the schema by name: `from __future__ import annotations` leaves field types as strings.
SCHEMA_TYPES = {name: value for module in (schema, data_schema) for name, value in vars(module).items()
                if isinstance(value, type) and hasattr(value, "__dataclass_fields__")}


def register_configs() -> None:
    """`base_config` in Hydra's ConfigStore: the schema every group file and override is checked against."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=LlmftConfig)


def _samples_resolver(name: str) -> str:
    return str(SAMPLES_DIR / name)


if not OmegaConf.has_resolver("llmft_samples"):
    # `${llmft_samples:tickets_sample.chat.jsonl}`: a file bundled with llmft, wherever it is installed.
    OmegaConf.register_new_resolver("llmft_samples", _samples_resolver)
if not OmegaConf.has_resolver("llmft_model_folder"):
    # `${llmft_model_folder:smollm2-135m-instruct}`: where `python -m llmft.models get NAME` puts a known model
    # ($LLMFT_MODELS/NAME, else the user's cache: config/known_models.py).
    OmegaConf.register_new_resolver("llmft_model_folder", lambda name: str(model_folder(name)))


def one_line_error(hydra_output: str) -> str:
    """Hydra's multi-line composition error (or its traceback) as one sentence naming the key (or group), what is
    expected, and the fix."""
    full_key = re.search(r"full_key:\s*(\S+)", hydra_output)
    key = full_key.group(1) if full_key else None
    missing_group = re.search(r"Could not find '([^']+)'", hydra_output)
    if missing_group:
        group = missing_group.group(1).split("/")[0]
        listed = hydra_output.split("Available options", 1)[-1].split("Config search path", 1)[0]
        options = [l.strip() for l in listed.splitlines()[1:] if l.strip()]
        return f"no config '{missing_group.group(1)}'; the options for {group}= are: {', '.join(options)}."
    unknown = re.search(r"Key '([^']+)' (?:not in|is not in struct|is not in) ?'?(\w*)'?", hydra_output)
    if unknown:
        key = key or unknown.group(1)
        hint = close_key(key)
        return (f"bad config: {key}: Key '{unknown.group(1)}' not in '{unknown.group(2) or key.rsplit('.', 1)[0]}'; "
                + (hint or "see `python -m llmft.launch --cfg job` for the valid keys."))
    wrong_type = re.search(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", hydra_output)
    if wrong_type:
        value, expected = wrong_type.group(1), wrong_type.group(3).lower()
        return f"bad config: {key or 'a key'}={value}: expected {'an' if expected[0] in 'aeiou' else 'a'} {expected}."
    not_valid = re.search(r"Value '(.*)' is not a valid (\w+)", hydra_output)
    if not_valid:
        return f"bad config: {key or 'a key'}={not_valid.group(1)}: expected a {not_valid.group(2)}."
    invalid_enum = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", hydra_output)
    if invalid_enum:
        return f"bad config: {key or 'a key'}={invalid_enum.group(1)}: expected one of {invalid_enum.group(2)}."
    lines = [l.strip() for l in hydra_output.strip().splitlines() if l.strip()]
    skip = ("Set the environment variable HYDRA_FULL_ERROR", "object_type=", "reference_type=", "full_key:",
            "To append to your config", "Traceback", "File ", "See https://hydra.cc", "^", "~")
    core = [l for l in lines if not l.startswith(skip)]
    reason = core[-1] if core else "invalid configuration"
    reason = re.sub(r"^[\w.]+(Error|Exception): ", "", reason)
    return f"bad config: {key + ': ' if key else ''}{reason} (see `python -m llmft.launch --cfg job` for the valid keys)."


def close_key(key: str) -> str | None:
    """`did you mean train.lr?` for a misspelt key, from the schema's own keys."""
    import difflib
    from dataclasses import fields, is_dataclass

    def keys_of(schema, prefix: str = "") -> list[str]:
        found = []
        for item in fields(schema):
            found.append(prefix + item.name)
            kind = item.type if isinstance(item.type, type) else None
            default = item.default_factory() if callable(item.default_factory) else None  # type: ignore[misc]
            nested = type(default) if is_dataclass(default) else kind if kind and is_dataclass(kind) else None
            if nested is None and isinstance(item.type, str):
                nested = SCHEMA_TYPES.get(item.type.replace("Optional[", "").rstrip("]"))
            if nested is not None:
                found += keys_of(nested, f"{prefix}{item.name}.")
        return found

    group, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in keys_of(LlmftConfig) if k.rpartition(".")[0] == group]
    candidates = [f"{group}.{c}" if group else c for c in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
    return f"did you mean {candidates[0]}?" if candidates else None


def error_chain(error: BaseException) -> str:
    """The messages of an exception and its causes, for `one_line_error` (Hydra wraps OmegaConf's errors)."""
    chain, cause = [], error
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__
    return "\n".join(chain)


def typed_config(source: DictConfig | dict, mismatch: str | None = None) -> DictConfig:
    """`source` typed by the schema: an OmegaConf structured DictConfig of `LlmftConfig`, where enums are enums and
    every key the schema defaults is present; ConfigError in one sentence for an unknown key or a wrong value
    (`mismatch`: what to say first, for a saved config.yaml).

    A structured DictConfig, not the schema's dataclasses (OmegaConf.to_object): `plan` shows configs whose `???`
    values the user gives only at launch (a dataclass cannot hold a missing value), the launcher updates a resumed
    run's config by dotted keys (OmegaConf.update / select), and Hydra hands its task a DictConfig. The typed nodes
    give the same guarantee downstream: a field reads as its schema type."""
    try:
        return OmegaConf.merge(OmegaConf.structured(LlmftConfig), source)  # type: ignore[return-value]
    except Exception as error:  # OmegaConf's ConfigKeyError / ValidationError
        if mismatch is None:
            raise ConfigError(one_line_error(str(error))) from None
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"{mismatch}: {reason}.") from None


def compose(overrides: list[str]) -> DictConfig:
    """`conf/config.yaml` with these overrides, typed by the schema; ConfigError with one sentence otherwise."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as error:  # Hydra's and OmegaConf's composition errors
        raise ConfigError(one_line_error(error_chain(error))) from None
    return typed_config(composed)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as their names), as written to the run directory."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
