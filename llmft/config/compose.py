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

import functools
import re
import sys
import textwrap
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
                + (hint or f"`{running_command()} --help` lists the groups and keys."))
    ambiguous = re.search(r"Ambiguous value for argument '([^=']+)=([^']*)'", hydra_output)  # a comma, no -m
    key = key or (ambiguous.group(1).lstrip("+~") if ambiguous else None)
    if re.search(r"is not a ListConfig|Cannot merge ListConfig", hydra_output) or (ambiguous and key in list_keys()):
        key = key or "KEY"
        merged = re.search(r"Error merging override \+*~?([^=\s]+)=", hydra_output)
        if merged and not key.startswith(merged.group(1)):  # inside the value of another key (a mixture's sources)
            return (f"bad config: {key} takes a list: write {key.rpartition('.')[2]}: [first, second] in the value of "
                    f"{merged.group(1)} given to {running_command()}.")
        return (f"bad config: {key} takes a list: {running_command()} ... '{key}=[first,second]' (the quotes keep "
                f"the brackets from the shell; one value alone: {key}=first).")
    if ambiguous:
        value, command = ambiguous.group(2), running_command()
        sweep = (f"a comma separates the values of a sweep: add -m for one run per value ({command} -m "
                 f"{key}={value}), or " if command.endswith("launch") else "")
        return f"bad config: {key}={value}: {sweep}quote a text that holds commas: '{key}=\"{value}\"'."
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
    return f"bad config: {key + ': ' if key else ''}{reason} (`{running_command()} --help` lists the groups and keys)."


def running_command() -> str:
    """The command this process runs, as a user types it (`python -m llmft.data prepare`), for the errors and help
    that name it. `python -m llmft.X` and the `llmft X` console script alike leave the module's file in sys.argv[0]
    (runpy); anything else (a test calling a function) is taken for `python -m llmft.launch`."""
    path = Path(sys.argv[0] if sys.argv and sys.argv[0] else "")
    module = path.parent.name if path.name == "__main__.py" else path.stem
    package = path.parent.parent.name if path.name == "__main__.py" else path.parent.name
    if package != "llmft" or module not in ("launch", "plan", "runs", "data", "eval", "chat", "export", "train"):
        return "python -m llmft.launch"
    verb = sys.argv[1] if module == "data" and len(sys.argv) > 1 and sys.argv[1] in ("prepare", "inspect") else ""
    return f"python -m llmft.{module}" + (f" {verb}" if verb else "")


# Names other tools give to llmft's keys (Hugging Face's Trainer and PEFT, axolotl, torchtune, Lightning...): a key
# of that name, in any group or none (or in the group named), gets "did you mean" the llmft key or setting.
OTHER_NAMES = {
    "learning_rate": "train.lr", "lr_rate": "train.lr", "base_lr": "train.lr", "max_lr": "train.lr",
    "num_epochs": "train.epochs", "num_train_epochs": "train.epochs", "n_epochs": "train.epochs",
    "epoch": "train.epochs", "max_epochs": "train.epochs",
    "batch_size": "train.micro_batch_size", "per_device_train_batch_size": "train.micro_batch_size",
    "train_batch_size": "train.micro_batch_size", "micro_batch": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps", "gradient_accumulation": "train.grad_accum_steps",
    "grad_accum": "train.grad_accum_steps", "accumulate_grad_batches": "train.grad_accum_steps",
    "num_warmup_steps": "train.warmup_steps", "warmup": "train.warmup_steps", "lr_warmup_steps": "train.warmup_steps",
    "steps": "train.max_steps", "num_steps": "train.max_steps", "total_steps": "train.max_steps",
    "max_iters": "train.max_steps", "training_steps": "train.max_steps", "num_training_steps": "train.max_steps",
    "gradient_clipping": "train.max_grad_norm", "clip_grad_norm": "train.max_grad_norm",
    "grad_clip": "train.max_grad_norm", "gradient_clip_val": "train.max_grad_norm",
    "gradient_checkpointing": "train.activation_checkpointing",
    "enable_activation_checkpointing": "train.activation_checkpointing",
    "logging_steps": "train.log_every", "log_steps": "train.log_every", "eval_steps": "train.eval_every",
    "save_steps": "train.save_every", "save_total_limit": "train.keep_last",
    "bf16": "train.precision", "fp16": "train.precision", "mixed_precision": "train.precision",
    "dtype": "model.dtype", "train.dtype": "model.dtype", "torch_dtype": "model.dtype",
    "rank": "peft.r", "lora_r": "peft.r", "lora_rank": "peft.r",
    "lora_alpha": "peft.alpha", "lora_dropout": "peft.dropout",
    "lora_target_modules": "peft.target_modules", "lora_target_linear": "peft.target_modules",
    "peft.type": "peft.method", "peft_type": "peft.method", "peft.lora": "peft=lora", "use_peft": "peft=lora",
    "load_in_4bit": "peft=qlora", "quantization": "peft=qlora",
    "max_length": "model.max_seq_len", "max_seq_length": "model.max_seq_len", "seq_len": "model.max_seq_len",
    "sequence_len": "model.max_seq_len", "sequence_length": "model.max_seq_len", "max_len": "model.max_seq_len",
    "cutoff_len": "model.max_seq_len", "block_size": "model.max_seq_len", "model_max_length": "model.max_seq_len",
    "context_length": "model.max_seq_len",
    "model_name_or_path": "model.path", "pretrained_model_name_or_path": "model.path", "base_model": "model.path",
    "model_path": "model.path", "model_name": "model=NAME (a group option) or model.path",
    "dataset": "data.path", "dataset_path": "data.path", "train_file": "data.path", "data_path": "data.path",
    "data_files": "data.path", "datasets": "data.path",
    "system_message": "data.system_prompt", "val_set_size": "data.validation_fraction",
    "validation_split": "data.validation_fraction", "eval_fraction": "data.validation_fraction",
    "sample_packing": "data.packing", "pack": "data.packing",
    "output_dir": "run_dir", "out_dir": "run_dir", "outdir": "run_dir",
    "deepspeed": "parallelism=zero2, zero3 or zero3_offload", "zero_stage": "parallelism=zero2 or zero3",
    "fsdp": "parallelism=fsdp",
    "nproc_per_node": "launch.nproc", "num_processes": "launch.nproc",
    "num_nodes": "cluster.nodes", "gpus": "cluster.gpus_per_node", "num_gpus": "launch.nproc or cluster.gpus_per_node",
    "time_limit": "cluster.time", "walltime": "cluster.time",
    "report_to": "train.wandb or train.mlflow", "use_wandb": "train.wandb", "use_mlflow": "train.mlflow",
    "dpo_beta": "objective.beta", "loss_type": "objective.loss",
    "eval.max_length": "eval.max_new_tokens", "eval.max_tokens": "eval.max_new_tokens",
}


def schema_keys(schema: type = LlmftConfig, prefix: str = "") -> dict[str, str]:
    """Every key of the schema (`train.lr`, `data.tickets.staff_domains`), dotted, with its type as written in the
    dataclass (`float`, `list[str]`, `Optional[list[str]]`); the nested dataclasses' own keys follow theirs."""
    from dataclasses import fields, is_dataclass

    found = {}
    for item in fields(schema):
        type_name = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", str(item.type))
        found[prefix + item.name] = type_name
        default = item.default_factory() if callable(item.default_factory) else None  # type: ignore[misc]
        nested = type(default) if is_dataclass(default) else None
        if nested is None:
            nested = SCHEMA_TYPES.get(type_name.replace("Optional[", "").rstrip("]"))
        if nested is not None:
            found.update(schema_keys(nested, f"{prefix}{item.name}."))
    return found


@functools.lru_cache(maxsize=1)
def list_keys() -> frozenset[str]:
    """The keys whose value is a list of texts (`data.tickets.staff_domains`, `peft.target_modules`...)."""
    return frozenset(key for key, kind in schema_keys().items()
                     if re.fullmatch(r"(Optional\[)?(list|List)\[str\]\]?", kind.replace(" ", "")))


def close_key(key: str) -> str | None:
    """`did you mean train.lr?` for a key the schema does not have: its name in other tools (`train.learning_rate`,
    `peft.rank`, `num_epochs`), the key in another group (`train.r` -> peft.r), or a misspelling
    (`train.warmup_step`)."""
    import difflib

    keys = schema_keys()
    key = key.lstrip("+~")
    group, _, leaf = key.rpartition(".")
    if key in OTHER_NAMES or leaf in OTHER_NAMES:
        return f"did you mean {OTHER_NAMES.get(key) or OTHER_NAMES[leaf]}?"
    elsewhere = [k for k in keys if k.rpartition(".")[2] == leaf]  # the key in the wrong group: train.r
    if elsewhere:
        return f"did you mean {' or '.join(elsewhere[:3])}?"
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == group]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"did you mean {f'{group}.{close[0]}' if group else close[0]}?"
    leaves = {k.rpartition(".")[2]: k for k in keys}
    elsewhere = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)]
    return f"did you mean {' or '.join(elsewhere[:3])}?" if elsewhere else None


def bracket_lists(overrides: list[str]) -> list[str]:
    """The overrides with a list key given without brackets made a list, as the user meant it:
    `data.tickets.staff_domains=hpc.example.org` -> `[hpc.example.org]`, `peft.target_modules=q_proj,v_proj` ->
    `[q_proj,v_proj]`. Anything else, and a value that already is a list, a sweep (`choice(...)`), null or an
    interpolation, is left to Hydra as given."""
    keys = list_keys()
    result = []
    for override in overrides:
        name, sep, value = override.partition("=")
        key = name.lstrip("+")
        if not sep or key not in keys or name.startswith("~") or value.strip().startswith(("[", "${")) \
                or value.strip() in ("null", "???") or re.match(r"^\s*\w+\(", value):
            result.append(override)
            continue
        items = [item.strip() for item in value.split(",")] if value.strip() else []
        result.append(f"{name}=[{','.join(_list_item(item) for item in items)}]")
    return result


def _list_item(item: str) -> str:
    """One value of a list, quoted where Hydra's override grammar would not read it as one text."""
    if re.fullmatch(r"[\w/\-+.$%*@?|: ]+", item) and not re.fullmatch(r"[\d.eE+\-]+|true|false|null", item):
        return item
    quote = "'" if "'" not in item else '"'
    return f"{quote}{item}{quote}" if quote not in item else item


GROUPS = ("model", "data", "peft", "parallelism", "train", "objective", "cluster")  # conf/'s folders, in that order


def group_options() -> dict[str, tuple[list[str], str | None]]:
    """Each group of conf/: its options (file names) and the one conf/config.yaml picks by default (None: cluster,
    which only `+cluster=NAME` adds)."""
    defaults = dict(re.findall(r"^\s*-\s*(\w+):\s*(\w+)\s*$", (CONF_DIR / "config.yaml").read_text(), re.M))
    return {group: (sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")), defaults.get(group))
            for group in GROUPS if (CONF_DIR / group).is_dir()}


def config_help() -> str:
    """The groups with their options (from conf/) and the keys of each group (from the schema), for the `--help` of
    every command that composes a config (launch, plan, data prepare|inspect, runs)."""
    width, lines = 118, ["== Configuration groups == (choose one option: group=option; the default is marked *)"]
    for group, (options, default) in group_options().items():
        names = [f"{o}*" if o == default else o for o in options]
        head = f"  {'+' + group if group == 'cluster' else group:12} "
        lines += textwrap.wrap(" ".join(names), width, initial_indent=head, subsequent_indent=" " * len(head))
    lines += ["", "== Keys == (group.key=value; a list takes [a,b], one value or a comma list)",
              "Type, default and meaning of each: docs/configuration.md; the values composed: python -m llmft.launch "
              "--cfg job [overrides]."]
    keys = schema_keys()
    parents = [k for k in keys if any(j.startswith(k + ".") for j in keys)]  # train, data, data.tickets...
    for group in ["", *parents]:
        children = [k[len(group) + 1 if group else 0:] for k in keys if k.rpartition(".")[0] == group]
        names = [c + (".*" if f"{group}.{c}".lstrip(".") in parents else "") for c in children]
        head = f"  {group or '(top level)':18} "
        lines += textwrap.wrap(" ".join(n for n in names if group or not n.endswith(".*")), width,
                               initial_indent=head, subsequent_indent=" " * len(head))
    return "\n".join(lines)


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
            composed = hydra_compose(config_name="config", overrides=bracket_lists(list(overrides)))
    except Exception as error:  # Hydra's and OmegaConf's composition errors
        raise ConfigError(one_line_error(error_chain(error))) from None
    return typed_config(composed)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as their names), as written to the run directory."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
