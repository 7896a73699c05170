"""Composition: `llmft/conf/` + command-line overrides -> a typed `LlmftConfig`, or one sentence saying what is wrong.

`llmft.launch` composes through `@hydra.main` (for `--cfg job`, `-m` and the sweeper plugins); `plan`, `runs` and
`data` compose through Hydra's compose API with `compose()`. Both turn Hydra's multi-line errors into one line
with `one_line_error`. A run directory's saved config is read back with `load_run_config`.

The configs are package data (`llmft/conf/`), so a wheel installed anywhere finds them. No torch here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llmft.config.schema import LlmftConfig
from llmft.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONF_DIR = PACKAGE_DIR / "conf"
SAMPLES_DIR = PACKAGE_DIR / "data" / "samples"


def register_configs() -> None:
    """`base_config` in Hydra's ConfigStore: the schema every group file and override is checked against."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=LlmftConfig)


def _samples_resolver(name: str) -> str:
    return str(SAMPLES_DIR / name)


if not OmegaConf.has_resolver("llmft_samples"):
    # `${llmft_samples:tickets_sample.chat.jsonl}`: a file bundled with llmft, wherever it is installed.
    OmegaConf.register_new_resolver("llmft_samples", _samples_resolver)


def one_line_error(hydra_output: str) -> str:
    """Hydra's multi-line composition error as one sentence naming the key (or group), what is expected, and the fix."""
    lines = [l.strip() for l in hydra_output.strip().splitlines() if l.strip()]
    lines = [l for l in lines if not l.startswith(("Set the environment variable HYDRA_FULL_ERROR", "object_type="))]
    full_key = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("full_key:")), None)
    missing_group = re.search(r"Could not find '([^']+)'", hydra_output)
    if missing_group:
        group = missing_group.group(1).split("/")[0]
        listed = hydra_output.split("Available options", 1)[-1].split("Config search path", 1)[0]
        options = [l.strip() for l in listed.splitlines()[1:] if l.strip()]
        return f"no config '{missing_group.group(1)}'; the options for {group}= are: {', '.join(options)}."
    core = [l for l in lines if not l.startswith(("full_key:", "To append to your config", "Could not override",
                                                    "Error merging override", "Error parsing override",
                                                    "See https://hydra.cc"))]
    reason = core[0] if core else lines[0] if lines else "invalid configuration"
    key = f"{full_key}: " if full_key else ""
    return f"bad config: {key}{reason} (see `python -m llmft.launch --cfg job` for the valid keys)."


def error_chain(error: BaseException) -> str:
    """The messages of an exception and its causes, for `one_line_error` (Hydra wraps OmegaConf's errors)."""
    chain, cause = [], error
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__
    return "\n".join(chain)


def compose(overrides: list[str]) -> DictConfig:
    """`conf/config.yaml` with these overrides, typed by the schema; ConfigError with one sentence otherwise."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as error:  # Hydra's and OmegaConf's composition errors
        raise ConfigError(one_line_error(error_chain(error))) from None


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as their names), as written to the run directory."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def load_run_config(run_dir) -> DictConfig:
    """The typed config saved in a run directory (`config.yaml`), checked against the schema again."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is {run_dir} a run directory created by llmft.launch?")
    schema = OmegaConf.structured(LlmftConfig)
    try:
        return OmegaConf.merge(schema, OmegaConf.load(path))  # type: ignore[return-value]
    except Exception as error:  # a config.yaml written by another llmft version, or edited by hand
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"{path} does not match llmft's schema: {reason}.") from None
