"""A run that starts from another run's final model (`init_from=RUN_DIR`): what it takes from that run, and what it
refuses. Torch-free: the launcher derives the new run's config with it on the login node, and the ranks ask it which
adapter their LoRA starts from.

    starting_config(cfg, given)  the config of a new run that starts from cfg.init_from, and the line that says so
    starting_adapter(cfg)        the adapter file a run's LoRA starts from, or None (a fresh LoRA, or whole weights)
    origin(cfg)                  what provenance.json records about where the run started

What comes with that run: its `model` section, with model.path pointing at the folder to load (the base model under
its adapter: its model.path, or RUN_DIR/base_model for model=tiny; its final/ folder after full fine-tuning), and its
`peft` section. The new run may change how it runs (model.max_seq_len, model.dtype, peft.dropout, peft=qlora over
lora...), never what it loads: another model, or a LoRA of another shape or scale, is refused in one sentence.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmft.config.schema import ObjectiveKind, PeftMethod
from llmft.errors import ConfigError
from llmft.rundir.files import read_config, read_provenance, read_summary
from llmft.rundir.layout import final_adapter_path, final_dir, is_run_dir, tiny_base_dir

# What a run started from another may set: how it runs, not what it loads.
FREE_MODEL_KEYS = ("max_seq_len", "attn_implementation", "dtype", "fallback_chat_template", "arch")
FREE_PEFT_KEYS = ("method", "dropout", "quant_type", "double_quant", "compute_dtype")
ADAPTER_SHAPE_KEYS = ("r", "alpha", "target_modules")  # an adapter loads only into one of the same shape and scale


def source_dir(path: str) -> Path:
    return Path(os.path.expandvars(str(path))).expanduser().resolve()


def final_kind(run_dir: Path) -> str | None:
    """What a run's final/ folder holds: "adapter" (LoRA / QLoRA), "weights" (full fine-tuning), or None."""
    final = final_dir(run_dir)
    if (final / "adapter_config.json").is_file() and final_adapter_path(run_dir).is_file():
        return "adapter"
    if (final / "config.json").is_file() and ((final / "model.safetensors").is_file()
                                              or (final / "model.safetensors.index.json").is_file()):
        return "weights"
    return None


def starting_config(cfg: DictConfig, given: list[str]) -> tuple[DictConfig, str]:
    """`cfg` (composed, with init_from set) made to start from that run, and the line that says how. `given`: the
    command's overrides; only they may differ from that run's model and peft settings, and only where the model
    still loads. ConfigError in one sentence when the run cannot start from it."""
    key = f"init_from={cfg.init_from}"
    source = source_dir(cfg.init_from)
    if not is_run_dir(source):
        raise ConfigError(f"{key} is not a run directory (no config.yaml in {source}): give the `run dir:` that "
                          f"llmft.launch printed for the run to start from.")
    kind = final_kind(source)
    if kind is None:
        status = read_summary(source).get("status") or "without summary.json"
        raise ConfigError(f"{key} has no final model (no adapter or weights in {final_dir(source)}; the run is "
                          f"{status}): finish it first with python -m llmft.launch resume={source}, or start from a "
                          f"run that completed.")
    saved = read_config(source)
    if cfg.model.name != saved.model.name:
        raise ConfigError(f"{key} trained model={saved.model.name} and this command composes model={cfg.model.name}: "
                          f"add model={saved.model.name} to it (a run starts from another on that run's model).")
    model, peft = copy.deepcopy(saved.model), copy.deepcopy(saved.peft)
    if kind == "weights":
        model.path = str(final_dir(source))
    elif saved.model.path is None:  # model=tiny: the random base that run built, and its tokenizer
        model.path = str(tiny_base_dir(source))
    for override in given:
        name = override.lstrip("+~").split("=", 1)[0]
        if name == "peft":  # peft=qlora over a lora run: the method and its quantization change, not the adapter
            for free in FREE_PEFT_KEYS:
                peft[free] = cfg.peft[free]
            continue
        section, _, sub = name.partition(".")
        if section not in ("model", "peft") or not sub or "=" not in override:
            continue
        target = model if section == "model" else peft
        free = FREE_MODEL_KEYS if section == "model" else FREE_PEFT_KEYS + ADAPTER_SHAPE_KEYS  # shapes: checked below
        value = OmegaConf.select(cfg[section], sub)
        if sub.split(".")[0] in free:
            OmegaConf.update(target, sub, value, merge=False)
        elif not _same(sub, value, OmegaConf.select(target, sub)):
            raise ConfigError(f"{key} trains that run's model ({saved.model.name} from {model.path}); {name}="
                              f"{_shown(value)} would load another: leave it out, or start without init_from.")
    if kind == "adapter":
        _check_adapter_fits(key, source, saved, model, peft, cfg)
    cfg.model, cfg.peft = model, peft
    cfg.init_from = str(source)
    return cfg, _what_it_starts_from(source, kind, saved, cfg)


def _check_adapter_fits(key: str, source: Path, saved: DictConfig, model, peft, cfg: DictConfig) -> None:
    if peft.method is PeftMethod.full:
        raise ConfigError(f"{key} holds a LoRA adapter, which peft=full cannot start from: merge it first (python -m "
                          f"llmft.export run={source} out=DIR merge=true), then train peft=full with model.path=DIR "
                          f"and without init_from.")
    for name in ADAPTER_SHAPE_KEYS:
        if name == "target_modules":  # what PEFT adapts: peft.target_modules, else the model's own list
            theirs = sorted(saved.peft.target_modules or saved.model.lora_target_modules)
            mine = sorted(peft.target_modules or model.lora_target_modules)
        else:
            theirs, mine = saved.peft[name], peft[name]
        if theirs != mine:
            raise ConfigError(f"{key}: its adapter has peft.{name}={_shown(theirs)} and this run asks peft.{name}="
                              f"{_shown(mine)}; a LoRA adapter starts only one of the same shape and scale: leave "
                              f"peft.{name} out.")
    if cfg.objective.kind is not ObjectiveKind.sft and cfg.objective.precompute_reference is False:
        raise ConfigError(f"objective={cfg.objective.kind.value} with {key}: the reference is the model this run "
                          f"starts from (the base with that run's adapter), whose log-probabilities are computed "
                          f"before the first step: leave objective.precompute_reference=false out.")


def _what_it_starts_from(source: Path, kind: str, saved: DictConfig, cfg: DictConfig) -> str:
    method = cfg.peft.method
    if kind == "adapter":
        start = (f"its {saved.peft.method.value} adapter (peft.r={saved.peft.r}), trained on as this run's "
                 f"{method.value} adapter, on its base model {cfg.model.path}")
    else:
        start = f"its final weights ({cfg.model.path})" + \
            (f" under a new {method.value} adapter" if method is not PeftMethod.full else ", all trained")
    objective = cfg.objective.kind
    reference = ""
    if objective is not ObjectiveKind.sft:
        how = "with the new adapter disabled" if kind == "weights" and method is not PeftMethod.full else \
            "its log-probabilities computed once before the first step"
        reference = f"; the {objective.value.upper()} reference is that model ({how})"
    return f"init_from: this run starts from {source}: {start}{reference}."


def _same(sub: str, given, theirs) -> bool:
    if sub == "path":
        return given is not None and theirs is not None and source_dir(given) == source_dir(theirs)
    return _plain(given) == _plain(theirs)


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _shown(value) -> str:
    value = _plain(value)
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def starting_adapter(cfg) -> Path | None:
    """The adapter file this run's LoRA starts from: the final adapter of `init_from`. None without init_from, for
    full fine-tuning, and when that run's final model is whole weights (they are this run's model.path, under a
    fresh adapter). The file may be gone since the launch: the loader says so."""
    if not cfg.init_from or cfg.peft.method is PeftMethod.full:
        return None
    source = source_dir(cfg.init_from)
    if cfg.model.path is not None and source_dir(cfg.model.path) == source_dir(final_dir(source)):
        return None
    return final_adapter_path(source)


def origin(cfg) -> dict:
    """Where a run started (provenance.json's `init_from`): that run, what its final model is, its objective and
    method, its steps and code version."""
    source = source_dir(cfg.init_from)
    saved, summary = read_config(source), read_summary(source)
    return {"run_dir": str(source), "final_dir": str(final_dir(source)), "kind": final_kind(source),
            "model_path": cfg.model.path, "objective": saved.objective.kind.value, "peft": saved.peft.method.value,
            "steps": summary.get("steps"), "git_commit": read_provenance(source).get("git_commit")}
