"""The one validation step: every cross-field check a type cannot express, run on the login node before anything
is created or submitted (`llmft.launch`, `plan` and `data` call `validate`), so nothing waits hours in a queue to
be refused. Raises ConfigError with one sentence naming the key and the fix. No torch here.
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from llmft.config.arguments import parse_arguments
from llmft.config.compose import one_line_error
from llmft.config.redact import REDACTED
from llmft.config.families import EAGER_ATTENTION_ONLY, NO_POSITION_IDS, model_family
from llmft.config.known_models import known_model_of_folder
from llmft.config.data_schema import DataFormat
from llmft.config.schema import (ATTENTION_IMPLEMENTATIONS, DpoLoss, EvalConfig, LlmftConfig, LossHead, ObjectiveKind,
                                 Parallelism, PeftMethod)
from llmft.errors import ConfigError, missing_extras

DTYPES = ("float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4")
EVAL_SPLITS = ("auto", "validation", "test")


def validate(cfg: DictConfig, check_paths: bool = True, training: bool = True) -> None:
    """Every check of a composed config. `check_paths=False` skips the checks that files exist (for composing a config
    meant for another machine, as `plan` does); `training=False` (data prepare) leaves out what only training needs
    (the objective that suits the data)."""
    check_schema(cfg)
    if check_paths:  # `???` in a group file: a value the user must give (plan shows a job without it)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{missing[0]} is not set: add {missing[0]}=... to the command"
                              + (f" (also unset: {', '.join(missing[1:])})" if missing[1:] else "") + ".")
    check_train(cfg)
    check_model_and_peft(cfg)
    if training:
        check_objective(cfg)
    check_data(cfg.data, complete=check_paths)
    check_eval(cfg.eval, check_paths)
    world_size = cfg.launch.nproc if cfg.cluster is None else None  # a cluster's: checked with its resources
    if world_size is not None:
        settle_parallelism(cfg, world_size, "launch.nproc")
    if not check_paths:
        return
    for key, data in data_configs(cfg.data):  # a mixture: each of its sources
        if not Path(os.path.expandvars(data.path)).expanduser().exists():
            raise ConfigError(f"{key}.path={data.path} does not exist: point {key}.path at your data file or folder.")
    problem = model_path_problem(cfg)
    if problem:
        raise ConfigError(problem + ".")
    check_loss_head(cfg)
    check_packing(cfg)


def check_schema(cfg: DictConfig) -> None:
    """Keys added with `+group.key=value` pass Hydra's composition; the schema refuses them here, before a run
    directory exists."""
    try:
        OmegaConf.merge(OmegaConf.structured(LlmftConfig), OmegaConf.to_container(cfg, resolve=False))
    except Exception as error:  # OmegaConf's ConfigKeyError / ValidationError
        raise ConfigError(one_line_error(str(error))) from None


def check_train(cfg: DictConfig) -> None:
    train = cfg.train
    positive = {
        "train.lr": train.lr,
        "train.micro_batch_size": train.micro_batch_size,
        "train.grad_accum_steps": train.grad_accum_steps,
        "train.epochs": train.epochs,
        "train.log_every": train.log_every,
        "train.eval_every": train.eval_every,
        "model.max_seq_len": cfg.model.max_seq_len,
        "peft.r": cfg.peft.r,
        "launch.nproc": cfg.launch.nproc,
        "train.save_timeout_min": train.save_timeout_min,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive.")
    if train.max_steps == 0 or train.max_steps < -1:
        raise ConfigError(f"train.max_steps={train.max_steps} must be a positive step count, or -1 for `train.epochs`.")
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={train.min_lr_ratio} must be between 0 and 1.")
    if train.keep_last < 1:
        raise ConfigError(f"train.keep_last={train.keep_last} must be at least 1.")
    if train.save_every < 0:
        raise ConfigError(f"train.save_every={train.save_every} must be 0 (only at the end) or a step count.")
    if not re.fullmatch(r"0?[0-7]{3}", str(cfg.umask)):
        raise ConfigError(f"umask={cfg.umask} is not an octal mask such as 027.")


def check_model_and_peft(cfg: DictConfig) -> None:
    model, peft = cfg.model, cfg.peft
    if model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={model.dtype} is not one of {', '.join(DTYPES)}.")
    if model.path is None and model.tiny is None:
        raise ConfigError(f"model.path is not set for model={model.name}: set model.path=/path/to/a/local/hf/folder.")
    if peft.method is not PeftMethod.full and not (peft.target_modules or model.lora_target_modules):
        raise ConfigError("No LoRA target modules: set peft.target_modules=[q_proj,v_proj] or model.lora_target_modules.")
    if model.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={model.attn_implementation} is not one of "
                          f"{', '.join(ATTENTION_IMPLEMENTATIONS)}; auto chooses per device.")
    if model.path is not None and model_family(model) in EAGER_ATTENTION_ONLY \
            and model.attn_implementation not in ("auto", "eager"):
        raise ConfigError(f"model={model.name} is a {model_family(model).value} model, which transformers runs with "
                          f"eager attention only: set model.attn_implementation=eager.")
    if peft.method is PeftMethod.qlora:
        if peft.quant_type not in QUANT_TYPES:
            raise ConfigError(f"peft.quant_type={peft.quant_type} must be one of {', '.join(QUANT_TYPES)}.")
        if peft.compute_dtype not in DTYPES:
            raise ConfigError(f"peft.compute_dtype={peft.compute_dtype} must be one of {', '.join(DTYPES)}.")
        if cfg.parallelism.strategy not in (Parallelism.auto, Parallelism.single, Parallelism.ddp):  # no fsdp, hsdp, zero
            raise ConfigError(
                f"peft=qlora runs with parallelism=single or ddp; parallelism={cfg.parallelism.strategy.value} "
                "would need 4-bit weights sharded, which llmft does not do yet."
            )


# The data format each objective trains on (the other formats hold conversations: supervised fine-tuning).
OBJECTIVE_FORMATS = {ObjectiveKind.dpo: DataFormat.preference_jsonl, ObjectiveKind.kto: DataFormat.kto_jsonl}


def check_objective(cfg: DictConfig) -> None:
    objective = cfg.objective  # (a run directory older than the objective group reads back with the default, sft)
    kind, data_format = objective.kind, cfg.data.format
    wanted = OBJECTIVE_FORMATS.get(kind)
    if wanted is not None and data_format is not wanted:
        raise ConfigError(f"objective={kind.value} trains on data.format={wanted.value} (data.format="
                          f"{data_format.value} holds "
                          f"{'conversations' if data_format not in OBJECTIVE_FORMATS.values() else 'other examples'}); "
                          f"point data= at {wanted.value} data (data="
                          f"{'preferences_sample' if kind is ObjectiveKind.dpo else 'kto_sample'} to try it).")
    other = {v: k for k, v in OBJECTIVE_FORMATS.items()}.get(data_format)
    if wanted is None and other is not None:
        raise ConfigError(f"data.format={data_format.value} holds examples for objective={other.value}: add "
                          f"objective={other.value} to the command.")
    if kind is ObjectiveKind.sft:
        return
    if objective.beta <= 0:
        raise ConfigError(f"objective.beta={objective.beta} must be positive (0.1 is the usual value).")
    if not 0.0 <= objective.label_smoothing < 0.5:
        raise ConfigError(f"objective.label_smoothing={objective.label_smoothing} must be in [0, 0.5).")
    if kind is ObjectiveKind.dpo and objective.loss is DpoLoss.ipo and objective.label_smoothing:
        raise ConfigError("objective.label_smoothing applies to objective.loss=sigmoid only: set it to 0 for ipo.")
    if objective.desirable_weight <= 0 or objective.undesirable_weight <= 0:
        raise ConfigError("objective.desirable_weight and objective.undesirable_weight must be positive.")
    if cfg.peft.method is PeftMethod.full and objective.precompute_reference is False:
        raise ConfigError(f"objective={kind.value} with peft=full needs the reference model's log-probabilities "
                          f"computed once before training: set objective.precompute_reference=true (or null), llmft keeps no "
                          f"second copy of the model.")
    world_size = requested_world_size(cfg)
    if kind is ObjectiveKind.kto and world_size is not None and cfg.train.micro_batch_size * world_size < 2:
        raise ConfigError(f"objective=kto estimates its KL term from the other answers of a micro-batch: "
                          f"train.micro_batch_size={cfg.train.micro_batch_size} x {world_size} rank(s) must be at "
                          f"least 2 (set train.micro_batch_size=2).")


def check_data(data, complete: bool = True) -> None:
    """Data settings a type cannot check (fractions, thresholds, per-format options). `complete=False` (plan, for a
    config meant for another machine) leaves out what the user gives at launch (paths, the staff rule)."""
    data_format = data.format
    staff_set = bool(data.tickets.staff_domains or data.tickets.staff_addresses)
    if complete and data_format in (DataFormat.tickets_jsonl, DataFormat.email) and not staff_set:
        raise ConfigError(f"data.format={data_format.value} needs to know who answers: set "
                          f"data.tickets.staff_domains=[support.example.org] (or data.tickets.staff_addresses).")
    if not 0.0 <= data.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={data.validation_fraction} must be at least 0 (0: train on every "
                          f"ticket, evaluate with eval.file) and below 1.")
    if not 0.0 <= data.test_fraction < 1.0 - data.validation_fraction:
        raise ConfigError(f"data.test_fraction={data.test_fraction} must be at least 0 and leave room for training "
                          f"next to data.validation_fraction={data.validation_fraction}.")
    if not 0.0 < data.clean.near_duplicate_threshold <= 1.0:
        raise ConfigError(f"data.clean.near_duplicate_threshold={data.clean.near_duplicate_threshold} must be in "
                          f"(0, 1].")
    if data.clean.min_assistant_chars < 0 or data.clean.max_message_chars <= 0:
        raise ConfigError("data.clean.min_assistant_chars must be >= 0 and data.clean.max_message_chars positive.")
    if data.acronyms.conversations_per_acronym < 1:
        raise ConfigError("data.acronyms.conversations_per_acronym must be at least 1.")
    if not 1 <= data.acronyms.held_out_phrasings <= 7:  # of the 8 question templates of a language, one trains
        raise ConfigError(f"data.acronyms.held_out_phrasings={data.acronyms.held_out_phrasings}: give 1 to 7 "
                          f"(questions held out per acronym, of the 8 phrasings of its language).")
    if data_format is DataFormat.mixture:
        check_mixture(data, complete)
    elif list(getattr(data, "sources", None) or []):
        raise ConfigError(f"data.sources is set but data.format={data_format.value}: set data.format=mixture (or start "
                          f"from data=mixture) to mix them.")
    for key, pattern in [("data.email.ticket_id_pattern", data.email.ticket_id_pattern),
                         ("data.transcript.ticket_pattern", data.transcript.ticket_pattern),
                         *((f"data.scrub.patterns.{name}", p) for name, p in data.scrub.patterns.items())]:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"{key}={pattern!r} is not a regular expression ({error}).") from None
    if re.compile(data.email.ticket_id_pattern).groups != 1:
        raise ConfigError(f"data.email.ticket_id_pattern={data.email.ticket_id_pattern!r} needs exactly one capturing "
                          f"group (the ticket id).")
    if re.compile(data.transcript.ticket_pattern).groups != 1:
        raise ConfigError(f"data.transcript.ticket_pattern={data.transcript.ticket_pattern!r} needs exactly one "
                          f"capturing group (the ticket id).")
    roles = {str(speaker): str(role) for speaker, role in data.transcript.roles.items()}
    wrong = next((speaker for speaker, role in roles.items() if role not in ("user", "assistant", "drop")), None)
    if wrong is not None:
        raise ConfigError(f"data.transcript.roles.{wrong}={roles[wrong]} must be user, assistant or drop.")
    if data_format is DataFormat.transcript and "assistant" not in roles.values():
        raise ConfigError("data.transcript.roles maps no speaker to assistant: name the speaker who answers, "
                          "for example data.transcript.roles.IDRIS=assistant.")
    if len(data.csv.delimiter) != 1:
        raise ConfigError(f"data.csv.delimiter={data.csv.delimiter!r} must be one character.")
    if not list(data.csv.question_columns):
        raise ConfigError("data.csv.question_columns is empty: name the column(s) that hold the question.")
    num_workers = getattr(data, "num_workers", None)
    if num_workers is not None and num_workers < 1:
        raise ConfigError(f"data.num_workers={num_workers} must be at least 1 (1: all in this process), or null for "
                          f"the CPUs available (at most 16).")


# What a mixture can mix: the formats that hold conversations (preference pairs train another objective).
MIXTURE_FORMATS = (DataFormat.chat_jsonl, DataFormat.tickets_jsonl, DataFormat.email, DataFormat.csv,
                   DataFormat.acronyms, DataFormat.transcript)


def data_configs(data) -> list[tuple[str, object]]:
    """(key, data config) of what is read: `data` itself, or each source of a mixture."""
    if data.format is not DataFormat.mixture:
        return [("data", data)]
    return [(f"data.sources[{i}]", source) for i, source in enumerate(data.sources)]


def check_mixture(data, complete: bool) -> None:
    """data.format=mixture: sources that are conversations, positive weights, distinct names; each source's own
    settings checked as a data config, its errors naming data.sources[i]."""
    if not list(data.sources):
        if not complete:
            return  # data=mixture composed for another machine (plan): the sources come at launch
        raise ConfigError("data.format=mixture needs data.sources: a list of data configs, each with a weight "
                          "(see data=mixture_sample).")
    if data.mixture_samples is not None and data.mixture_samples < 1:
        raise ConfigError(f"data.mixture_samples={data.mixture_samples} must be at least 1, or null for the sum of "
                          f"the sources' training samples.")
    names = []
    for index, (key, source) in enumerate(data_configs(data)):
        if source.format not in MIXTURE_FORMATS:
            raise ConfigError(f"{key}.format={source.format.value} cannot be mixed: a mixture's sources hold "
                              f"conversations ({', '.join(f.value for f in MIXTURE_FORMATS)}).")
        if isinstance(source, DictConfig) and OmegaConf.is_missing(source, "weight"):
            raise ConfigError(f"{key}.weight is not set: give each source its share, for example {key}.weight=0.5.")
        weight = source.weight
        if not (isinstance(weight, (int, float)) and 0 < weight < float("inf")):
            raise ConfigError(f"{key}.weight={weight} must be a positive number (the weights are normalised to "
                              f"shares of the training samples).")
        name = mixture_source_name(source, index)
        if not re.fullmatch(r"[\w.-]+", name):
            raise ConfigError(f"{key}.name={name!r} must be letters, digits, '_', '.' or '-' (it prefixes the ids of "
                              f"the source's conversations).")
        if name in names:
            raise ConfigError(f"{key}.name={name} is the name of another source too: give each source its own "
                              f"{key}.name.")
        names.append(name)
        try:
            check_data(source, complete)
        except ConfigError as error:  # the same checks, naming this source's keys
            raise ConfigError(re.sub(r"\bdata\.", f"{key}.", str(error))) from None


def mixture_source_name(source, index: int) -> str:
    """A source's name: `name`, or the file name of its `path` without extensions (tickets_sample.chat.jsonl:
    tickets_sample), or `source<index>` while the path is unset."""
    if source.name:
        return str(source.name)
    if isinstance(source, DictConfig) and OmegaConf.is_missing(source, "path"):
        return f"source{index}"
    return Path(str(source.path)).name.split(".")[0] or f"source{index}"


def with_eval_overrides(eval_cfg, overrides: list[str] = ()) -> EvalConfig:
    """The `eval` keys as a plain EvalConfig: the config's values, then its `eval.overrides`, then `overrides`;
    checked. An unknown key or a bad value raises ConfigError naming it."""
    base = eval_cfg if isinstance(eval_cfg, EvalConfig) else OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(EvalConfig), eval_cfg))
    arguments = [str(a) for a in base.overrides] + list(overrides)
    arguments = [a.lstrip("+").removeprefix("eval.") for a in arguments]
    return parse_arguments(arguments, base, "eval.KEY=VALUE", prefix="eval.")


def check_eval(eval_cfg, check_paths: bool = True) -> EvalConfig:
    """The `eval` keys, with `eval.overrides` applied, checked before a job waits in the queue; the settings."""
    settings = with_eval_overrides(eval_cfg) if not isinstance(eval_cfg, EvalConfig) else eval_cfg
    positive = {"eval.max_new_tokens": settings.max_new_tokens, "eval.batch_size": settings.batch_size,
                "eval.judge_timeout_s": settings.judge_timeout_s, "eval.judge_max_tokens": settings.judge_max_tokens,
                "eval.judge_concurrency": settings.judge_concurrency,
                "eval.judge_give_up_after": settings.judge_give_up_after}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive.")
    if settings.limit < 0:
        raise ConfigError(f"eval.limit={settings.limit} must be 0 (all) or a number of examples.")
    if settings.temperature < 0 or not 0 < settings.top_p <= 1:
        raise ConfigError("eval.temperature must be >= 0 and eval.top_p in (0, 1].")
    if settings.split not in EVAL_SPLITS:
        raise ConfigError(f"eval.split={settings.split} must be auto, validation or test "
                          f"(to evaluate other conversations, give them as eval.file=FILE).")
    if settings.judge_url and not re.match(r"https?://", settings.judge_url):
        raise ConfigError(f"eval.judge_url={settings.judge_url} must start with http:// or https://.")
    if settings.judge_api_key and settings.judge_api_key != REDACTED:
        print("llmft: warning: eval.judge_api_key (the key itself) is deprecated and still used: put the key in an "
              "environment variable and name it with eval.judge_api_key_env=VARIABLE (as data.acronyms."
              "llm_api_key_env).", file=sys.stderr)
    if check_paths and settings.file and not Path(os.path.expandvars(settings.file)).expanduser().exists():
        raise ConfigError(f"eval.file={settings.file} does not exist.")
    model = settings.embedding_model
    if check_paths and model and model.lower() != "off":
        folder = Path(os.path.expandvars(model)).expanduser()
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise ConfigError(f"eval.embedding_model={model} is not a sentence-transformers folder (no modules.json "
                              f"or config.json there).")
    return settings


DEEPSPEED_STRATEGIES = (Parallelism.zero2, Parallelism.zero3, Parallelism.zero3_offload)


# ZeRO-3 with frozen parameters (LoRA's base) and activation checkpointing fails in backward before this release
# ("CheckpointError ... saved [N] vs recomputed [0]": the recompute found the frozen weights partitioned again;
# DeepSpeed PR 8148, in 0.19.3). A site's module may ship an older one.
ZERO3_FROZEN_CHECKPOINTING_FIXED = (0, 19, 3)


def check_deepspeed_release(cfg: DictConfig) -> None:
    """Refuse, in one sentence, a DeepSpeed release known to fail with this run's settings."""
    from importlib.metadata import PackageNotFoundError, version

    zero3 = cfg.parallelism.strategy in (Parallelism.zero3, Parallelism.zero3_offload)
    if not (zero3 and cfg.peft.method is not PeftMethod.full and cfg.train.activation_checkpointing):
        return
    try:
        installed = version("deepspeed")
    except PackageNotFoundError:
        return
    release = tuple(int(part) for part in re.findall(r"\d+", installed)[:3])
    if release < ZERO3_FROZEN_CHECKPOINTING_FIXED:
        raise ConfigError(f"deepspeed {installed} fails in backward with parallelism={cfg.parallelism.strategy.value}, "
                          f"peft={cfg.peft.method.value} and train.activation_checkpointing=true (fixed in 0.19.3): "
                          f"pip install 'deepspeed>=0.19.3', or set train.activation_checkpointing=false.")


def check_installed(cfg: DictConfig, local: bool) -> None:
    """The optional packages this run needs, and a GPU where one is needed and the run is on this machine: one
    sentence naming every missing package and the one pip command that installs them, before a run directory is
    created."""
    strategy = cfg.parallelism.strategy
    missing = []  # (package, extra, what needs it)
    if strategy in DEEPSPEED_STRATEGIES and find_spec("deepspeed") is None:
        missing.append(("deepspeed", "deepspeed", f"parallelism={strategy.value}"))
    elif strategy in DEEPSPEED_STRATEGIES:
        check_deepspeed_release(cfg)
    if cfg.peft.method is PeftMethod.qlora:
        if local and not Path("/proc/driver/nvidia/version").exists():
            raise ConfigError("peft=qlora needs a CUDA GPU (bitsandbytes 4-bit) and this machine has none: use "
                              "peft=lora here, or submit to a GPU cluster with +cluster=NAME.")
        if find_spec("bitsandbytes") is None:
            missing.append(("bitsandbytes", "qlora", "peft=qlora"))
    if cfg.train.loss_head is LossHead.liger:
        if local and not Path("/proc/driver/nvidia/version").exists():
            raise ConfigError("train.loss_head=liger needs a CUDA GPU (Triton kernels) and this machine has none: use "
                              "train.loss_head=auto (the chunked loss here, Liger on GPUs where it is installed).")
        if find_spec("liger_kernel") is None:
            missing.append(("liger-kernel", "liger", "train.loss_head=liger"))
    if cfg.eval.after_train:
        missing += missing_eval_packages(check_eval(cfg.eval, check_paths=False), "eval.after_train=true")
    if cfg.train.mlflow:
        # sqlalchemy and alembic: the default store, RUNS_ROOT/mlflow.db (SQLite)
        names = [name for module, name in (("mlflow", "mlflow-skinny"), ("sqlalchemy", "sqlalchemy"),
                                           ("alembic", "alembic")) if find_spec(module) is None]
        if names:
            missing.append((" and ".join(names), "mlflow", "train.mlflow=true"))
    if missing:
        raise missing_extras(missing)


def missing_eval_packages(settings: EvalConfig, what: str = "llmft.eval") -> list[tuple[str, str, str]]:
    """What the evaluation needs and is not installed, as (packages, extra, what needs them)."""
    names = [name for module, name in (("rouge_score", "rouge-score"), ("sacrebleu", "sacrebleu"))
             if find_spec(module) is None]
    model = settings.embedding_model
    if model and model.lower() != "off" and find_spec("sentence_transformers") is None:
        names.append("sentence-transformers")  # eval.embedding_model
    return [(" and ".join(names), "eval", what)] if names else []


def check_eval_runtime(settings: EvalConfig, judge_env: bool = True) -> None:
    """What the evaluation needs installed, and a judge that can be asked (env vars filled in by then)."""
    missing = missing_eval_packages(settings)
    if missing:
        raise missing_extras(missing)
    if judge_env and settings.judge_url and not settings.judge_model:
        raise ConfigError("eval.judge_url is set but not eval.judge_model: name the model the endpoint serves "
                          "(eval.judge_model=NAME or LLMFT_JUDGE_MODEL).")


def settle_parallelism(cfg: DictConfig, world_size: int, where: Optional[str] = None,
                       ranks_per_node: Optional[int] = None) -> Parallelism:
    """The strategy `world_size` ranks run: parallelism=auto becomes single for one rank, ddp for LoRA / QLoRA and
    fsdp for full fine-tuning on several; any other strategy is itself. With `where` (what gives the ranks, named in
    the message), also checks that it can run on them: ConfigError for single on several ranks, or an hsdp shard size
    that does not divide them (`ranks_per_node`: the default shard group; the ranks of one node).

    The one place `auto` is settled. A local run directory keeps `auto` and each rank settles it from its real world
    size (training.strategies.build), so an sbatch template that prepares a run without a cluster still trains one
    synchronised model; a cluster job's run directory records the settled strategy (launch.slurm.resolve)."""
    strategy = cfg.parallelism.strategy
    if strategy is Parallelism.auto:
        strategy = Parallelism.single if world_size == 1 else \
            Parallelism.fsdp if cfg.peft.method is PeftMethod.full else Parallelism.ddp
    if where is None:
        return strategy
    if world_size > 1 and strategy is Parallelism.single:
        raise ConfigError(f"{where} gives {world_size} ranks, which need a distributed strategy (parallelism=single "
                          f"would train unsynchronised copies): use parallelism=auto (or ddp, fsdp, zero2, zero3).")
    if strategy is Parallelism.hsdp:
        hsdp_mesh_shape(cfg.parallelism.shard_size, world_size, ranks_per_node or world_size, where)
    return strategy


def hsdp_mesh_shape(shard_size: int, world_size: int, ranks_per_node: int, where: str) -> tuple[int, int]:
    """(replicas, ranks per shard group) of parallelism=hsdp; shard_size 0 means the ranks of one node."""
    shard = shard_size or ranks_per_node
    if shard < 1 or world_size % shard:
        raise ConfigError(f"parallelism.shard_size={shard_size} must divide the {world_size} ranks of {where} "
                          f"(0: the ranks of one node): choose a divisor of {world_size}.")
    return world_size // shard, shard


# config.json keys that make the LM head more than a matmul: the loss then needs the model's own full logits
LOGIT_SCALING_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_loss_head(cfg: DictConfig) -> None:
    """train.loss_head=chunked or liger on a model whose head scales its logits (Gemma 2/3, Cohere): refused here,
    where `auto` would quietly use full logits; liger for a trainable head under ZeRO-3 too, where `auto` takes the
    chunked head (loss.install)."""
    head = cfg.train.loss_head
    if head is LossHead.liger and cfg.peft.method is PeftMethod.full \
            and cfg.parallelism.strategy in (Parallelism.zero3, Parallelism.zero3_offload):
        raise ConfigError(f"train.loss_head=liger cannot train the LM head under parallelism="
                          f"{cfg.parallelism.strategy.value} with peft=full (Liger computes the head's gradient "
                          f"outside its partitioned module): use train.loss_head=auto or chunked.")
    if head not in (LossHead.chunked, LossHead.liger) or cfg.model.path is None:
        return
    config = json.loads((Path(os.path.expandvars(cfg.model.path)).expanduser() / "config.json").read_text())
    config = {**config, **config.get("text_config", {})}
    for key in LOGIT_SCALING_KEYS:
        if config.get(key) not in (None, 1, 1.0):
            raise ConfigError(f"train.loss_head={head.value} cannot apply to this model: its config.json sets {key}="
                              f"{config[key]}, so the loss needs full logits; use train.loss_head=auto or full_logits.")


def check_packing(cfg: DictConfig) -> None:
    """A model that takes no position ids (BLOOM: ALiBi) cannot tell packed samples apart. data.packing=null (auto,
    the default) is settled here, where the model's config.json is at hand: unpacked on such a model, said in one
    line, packed otherwise; data.packing=true on it is refused."""
    family = model_family(cfg.model)
    if family not in NO_POSITION_IDS:
        if cfg.data.packing is None:
            cfg.data.packing = True
        return
    if cfg.data.packing:
        raise ConfigError(f"model={cfg.model.name} is a {family.value} model (ALiBi: no position ids), so packed "
                          "samples would attend to each other: set data.packing=false.")
    if cfg.data.packing is None:
        cfg.data.packing = False
        print(f"llmft: model={cfg.model.name} is a {family.value} model (ALiBi: no position ids): training unpacked, "
              f"one sample a row (data.packing=false).")


def model_path_problem(cfg: DictConfig) -> Optional[str]:
    """Why model.path cannot be loaded (no config.json there), or None."""
    path = cfg.model.path
    if path is None or (Path(os.path.expandvars(path)).expanduser() / "config.json").is_file():
        return None
    known = known_model_of_folder(path)
    if known is not None:
        return (f"model.path={path} has no model yet (no config.json there): make it with `python -m llmft.models get "
                f"{known.name}`, or set model.path=/path/to/model")
    return (f"model.path={path} is not a local Hugging Face model folder (no config.json there): "
            f"copy the model there or set model.path=/path/to/model")


# A resume on another number of ranks (`llmft.launch resume=RUN_DIR launch.nproc=N`, or cluster.nodes /
# cluster.gpus_per_node): the checks the launcher runs before anything starts.

# Strategies whose checkpoints are the same files: a resumed run may move between single and ddp, and between fsdp and
# hsdp (DCP reshards between any two meshes: tests/training/test_hsdp.py); any other strategy reads only its own
# checkpoints (on any number of ranks).
CHECKPOINT_FORMATS = {Parallelism.single: "replica", Parallelism.ddp: "replica", Parallelism.fsdp: "dcp",
                      Parallelism.hsdp: "dcp"}


def requested_world_size(cfg: DictConfig) -> Optional[int]:
    """The ranks a config asks for: launch.nproc locally; cluster.nodes x cluster.gpus_per_node on a cluster (all the
    GPUs of a cluster.gpu node when gpus_per_node is unset). None when cluster.gpu is unknown (slurm.resolve says so)."""
    if cfg.cluster is None:
        return cfg.launch.nproc
    gpus_per_node = cfg.cluster.gpus_per_node
    if gpus_per_node is None:
        if cfg.cluster.gpu not in cfg.cluster.kinds:
            return None
        gpus_per_node = cfg.cluster.kinds[cfg.cluster.gpu].gpus_per_node
    return cfg.cluster.nodes * gpus_per_node


def world_size_keys(cfg: DictConfig) -> str:
    """The keys that set the number of ranks, with their values, for messages."""
    if cfg.cluster is None:
        return f"launch.nproc={cfg.launch.nproc}"
    gpus_per_node = cfg.cluster.gpus_per_node if cfg.cluster.gpus_per_node is not None else \
        f"{requested_world_size(cfg) // cfg.cluster.nodes} (a {cfg.cluster.gpu} node)"
    return f"cluster.nodes={cfg.cluster.nodes} x cluster.gpus_per_node={gpus_per_node}"


def grad_accum_keeping_global_batch(global_batch: int, cfg: DictConfig, world_size: int, run: str) -> int:
    """train.grad_accum_steps that makes `world_size` ranks of train.micro_batch_size take `global_batch` samples per
    optimizer step; ConfigError with the sizes that can when none does."""
    micro_batch_size = cfg.train.micro_batch_size
    if global_batch % (micro_batch_size * world_size) == 0:
        return global_batch // (micro_batch_size * world_size)
    world_sizes = [n for n in range(1, global_batch // micro_batch_size + 1) if global_batch % (micro_batch_size * n) == 0]
    micro_batch_sizes = [m for m in range(1, global_batch // world_size + 1) if global_batch % (m * world_size) == 0]
    ranks_key = "launch.nproc=" if cfg.cluster is None else "cluster.nodes x cluster.gpus_per_node = "
    fixes = ([f"{ranks_key}{_some(world_sizes)}"] if world_sizes else []) \
        + ([f"train.micro_batch_size={_some(micro_batch_sizes)} on these ranks"] if micro_batch_sizes else [])
    raise ConfigError(
        f"{run} keeps the run's global batch of {global_batch} samples per optimizer step, which {world_size} ranks "
        f"({world_size_keys(cfg)}) of train.micro_batch_size={micro_batch_size} cannot take: use "
        + (", or ".join(fixes) or f"a number of ranks that divides {global_batch} and a train.micro_batch_size that "
                                  f"divides {global_batch} / ranks")
        + " (train.grad_accum_steps then follows).")


def _some(values: list[int]) -> str:
    shown = [str(v) for v in values[:6]] + (["..."] if len(values) > 6 else [])
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def check_resume_strategy(checkpoint_strategy: str, checkpoint_name: str, cfg: DictConfig, world_size: int,
                          run: str) -> Parallelism:
    """The strategy this run settles to must read the checkpoint's files (CHECKPOINT_FORMATS: single <-> ddp,
    fsdp <-> hsdp); any other change (zero3 -> ddp, fsdp -> single with parallelism=auto and full fine-tuning...) is
    refused, naming the strategy that reads it. Returns the settled strategy."""
    saved, new = Parallelism(checkpoint_strategy), settle_parallelism(cfg, world_size)
    if CHECKPOINT_FORMATS.get(saved, saved.value) == CHECKPOINT_FORMATS.get(new, new.value):
        return new
    fix = Parallelism.ddp if saved is Parallelism.single and world_size > 1 else saved
    settles = f" (parallelism=auto on {world_size} rank{'s' if world_size > 1 else ''})" \
        if cfg.parallelism.strategy is Parallelism.auto else ""
    raise ConfigError(
        f"{run}: its checkpoint {checkpoint_name} was written by parallelism={saved.value}, which "
        f"parallelism={new.value}{settles} cannot read: add parallelism={fix.value} (a resume may change the strategy "
        f"only between single and ddp, or fsdp and hsdp, which read each other's checkpoints).")


def precomputes_reference(cfg) -> bool:
    """DPO and KTO: whether the reference's log-probabilities are computed once before training (full fine-tuning
    unless objective.precompute_reference says otherwise: no second copy of the model) rather than by the model with
    its adapter disabled at every step. Torch-free: plan counts the reference forwards from it."""
    if cfg.objective.kind is ObjectiveKind.sft:
        return False
    setting = cfg.objective.precompute_reference
    return cfg.peft.method is PeftMethod.full if setting is None else bool(setting)
