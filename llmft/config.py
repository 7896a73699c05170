"""The typed schema behind every group in `conf/`, and the one validation step.

Hydra composes `conf/config.yaml` on top of `LlmftConfig` (stored as `base_config` in the ConfigStore), so every
group file and every command-line override is checked against these dataclasses: an unknown key or a wrong type
fails at composition, on the login node, before anything runs. Cross-field checks that a type cannot express live
in `validate()`, which every entry point calls once.

This module imports no torch: the launcher and `plan` import it on the login node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from llmft.data.config import DataConfig, DataFormat  # noqa: F401  (the data group's schema lives beside its code)

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLES_DIR = PACKAGE_DIR / "data" / "samples"
CONF_DIR = PACKAGE_DIR.parent / "conf"


class ConfigError(Exception):
    """A user mistake in the configuration: printed as one sentence, never with a traceback."""


class PeftMethod(str, Enum):
    lora = "lora"
    qlora = "qlora"
    full = "full"


class Strategy(str, Enum):
    auto = "auto"  # single for one rank; ddp for LoRA / QLoRA and fsdp for full fine-tuning on several
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    zero2 = "zero2"
    zero3 = "zero3"
    zero3_offload = "zero3_offload"


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on a GPU that supports it, fp32 elsewhere (CPU)
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class TinyArchConfig:
    """Architecture of `model=tiny`: a small Llama built from a config with seeded random weights."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 2048  # size of the BPE tokenizer trained on the data at the start of the run
    # Standard deviation of the random weights. Larger than Llama's 0.02 on purpose: with the embeddings and the
    # output layer frozen (LoRA), 0.02 caps the logits near +-2.5 and the loss cannot fall far below uniform.
    initializer_range: float = 0.1


@dataclass
class ArchConfig:
    """A model's shape, for `plan` when the weights are not on this machine (config.json wins when they are)."""

    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    vocab_size: int = MISSING
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q, k, v


@dataclass
class ModelConfig:
    name: str = MISSING
    # Local Hugging Face folder (config.json, *.safetensors, tokenizer). None only for `tiny`, which is built.
    path: Optional[str] = None
    dtype: str = "bfloat16"  # dtype of the frozen weights: float32 | bfloat16 | float16
    max_seq_len: int = 2048
    lora_target_modules: list[str] = field(default_factory=list)
    attn_implementation: str = "sdpa"
    # Jinja chat template used when the tokenizer has none (base models). None: a ChatML-style fallback.
    fallback_chat_template: Optional[str] = None
    tiny: Optional[TinyArchConfig] = None  # model=tiny only: the architecture to build
    arch: Optional[ArchConfig] = None  # the published shape, for plan's estimates without the weights


@dataclass
class PeftConfig:
    method: PeftMethod = PeftMethod.lora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # None: the model's `lora_target_modules`
    # QLoRA only: 4-bit quantization of the frozen base (bitsandbytes, CUDA only)
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass
class ParallelismConfig:
    strategy: Strategy = Strategy.auto
    # ZeRO-3 keeps parameters smaller than these unpartitioned (DeepSpeed's defaults); 0 partitions everything.
    zero3_param_persistence_threshold: int = 100_000
    zero3_model_persistence_threshold: int = 9_223_372_036_854_775_807
    deepspeed_config: Optional[str] = None  # a JSON file merged over the config llmft generates


@dataclass
class TrainConfig:
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # the cosine schedule decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    epochs: int = 1
    max_steps: int = -1  # > 0 caps the run; -1: as many steps as `epochs` takes
    micro_batch_size: int = 4  # sequences per rank per forward pass
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    precision: Precision = Precision.auto
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (after activation checkpointing, before sharding)
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 100  # checkpoint every N optimizer steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept (plus the best by validation loss)
    wandb: bool = False  # also log to wandb, offline (pip install wandb)
    seed: int = 0


@dataclass
class LaunchConfig:
    nproc: int = 1  # local processes (ranks) for a run without a cluster
    wait: bool = False  # with a cluster: wait for the job to end and report its result (default: return at once)
    prepare_only: bool = False  # create the run directory and its config, print it, run nothing (sbatch templates)


@dataclass
class EvalAfterTrainConfig:
    # With a cluster: submit `python -m llmft.eval` as a job that starts only if training succeeds (afterok).
    after_train: bool = False
    overrides: list[str] = field(default_factory=list)  # for llmft.eval, e.g. ["eval.max_new_tokens=128"]
    time: str = "01:00:00"  # the evaluation job's time limit


@dataclass
class QosLimit:
    name: str = MISSING
    max_time: str = MISSING  # HH:MM:SS


@dataclass
class GpuKind:
    """One kind of GPU node of a cluster: where it is, what it has, which QoS it offers."""

    partition: Optional[str] = None
    constraint: Optional[str] = None  # sbatch -C
    gpus_per_node: int = 8
    cpus_per_gpu: int = 8  # one task per GPU gets this many CPUs
    memory_gb: int = 80  # per GPU, for plan's fit verdict
    peak_tflops: float = 312.0  # dense bf16, for plan's GPU-hour estimate
    account_suffix: Optional[str] = None  # Jean Zay: the account is <project>@<suffix>
    qos: list[QosLimit] = field(default_factory=list)  # shortest first: the first that fits cluster.time is used
    setup: list[str] = field(default_factory=list)  # lines run before srun for this kind (module load arch/a100)


@dataclass
class ClusterConfig:
    """A cluster profile (conf/cluster/NAME.yaml), selected with `+cluster=NAME`."""

    name: str = MISSING
    gpu: str = MISSING  # a key of `kinds`
    kinds: dict[str, GpuKind] = field(default_factory=dict)
    nodes: int = 1
    gpus_per_node: Optional[int] = None  # default: all the GPUs of a node of this kind
    time: str = "01:00:00"  # HH:MM:SS, at most the longest QoS of the kind
    account: Optional[str] = None
    account_required: bool = False
    qos: Optional[str] = None  # default: the shortest QoS of the kind whose limit covers `time`
    gpu_request: str = "gres"  # how GPUs are asked for: gres (--gres=gpu:N) | gpus_per_node | none
    hint_nomultithread: bool = False
    setup: list[str] = field(default_factory=list)  # lines run before srun (modules, venv activation)
    env: dict[str, str] = field(default_factory=dict)  # exported in the job (offline variables...)
    python: Optional[str] = None  # how the job starts Python (default: this Python); a container wrapper goes here
    runs_root: Optional[str] = None  # where cluster runs go (shared storage); default: the top-level runs_root
    signal_delay_s: int = 120  # SLURM sends USR2 this long before the time limit: checkpoint, requeue
    max_requeues: int = 3  # requeues at the time limit before the job gives up (resume it with resume=RUN_DIR)
    extra_sbatch: dict[str, str] = field(default_factory=dict)  # more sbatch options, e.g. {reservation: x}


@dataclass
class LlmftConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    peft: PeftConfig = MISSING
    parallelism: ParallelismConfig = MISSING
    train: TrainConfig = MISSING
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalAfterTrainConfig = field(default_factory=EvalAfterTrainConfig)
    cluster: Optional[ClusterConfig] = None  # absent: a local run; `+cluster=NAME` selects a profile
    runs_root: str = "runs"  # where timestamped run directories are created
    run_dir: Optional[str] = None  # set it to choose the run directory yourself
    resume: Optional[str] = None  # a run directory: continue it with its saved config (locally or on its cluster)
    umask: str = "027"  # run directories and checkpoints: group-readable, never world-readable


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=LlmftConfig)


def _samples_resolver(name: str) -> str:
    return str(SAMPLES_DIR / name)


if not OmegaConf.has_resolver("llmft_samples"):
    # `${llmft_samples:tickets_sample.chat.jsonl}`: a file bundled with llmft, wherever it is installed.
    OmegaConf.register_new_resolver("llmft_samples", _samples_resolver)


def validate(cfg: DictConfig, check_paths: bool = True) -> None:
    """Cross-field checks that the schema's types cannot express. Raises ConfigError with one sentence.

    `check_paths=False` skips the checks that files exist (for composing a config meant for another machine).
    """
    train, model, peft = cfg.train, cfg.model, cfg.peft
    positive = {
        "train.lr": train.lr,
        "train.micro_batch_size": train.micro_batch_size,
        "train.grad_accum_steps": train.grad_accum_steps,
        "train.epochs": train.epochs,
        "train.log_every": train.log_every,
        "train.eval_every": train.eval_every,
        "model.max_seq_len": model.max_seq_len,
        "peft.r": peft.r,
        "launch.nproc": cfg.launch.nproc,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive.")
    if train.max_steps == 0 or train.max_steps < -1:
        raise ConfigError(f"train.max_steps={train.max_steps} must be a positive step count, or -1 for `train.epochs`.")
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={train.min_lr_ratio} must be between 0 and 1.")
    if not 0.0 < cfg.data.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={cfg.data.validation_fraction} must be between 0 and 1 (exclusive).")
    if train.keep_last < 1:
        raise ConfigError(f"train.keep_last={train.keep_last} must be at least 1.")
    if model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={model.dtype} is not one of float32, bfloat16, float16.")
    if model.path is None and model.tiny is None:
        raise ConfigError(f"model.path is not set for model={model.name}: set model.path=/path/to/a/local/hf/folder.")
    if peft.method != PeftMethod.full and not (peft.target_modules or model.lora_target_modules):
        raise ConfigError("No LoRA target modules: set peft.target_modules=[q_proj,v_proj] or model.lora_target_modules.")
    if peft.method == PeftMethod.qlora:
        from llmft.model import quantization_kwargs  # noqa: PLC0415  (no torch at import time)

        quantization_kwargs(peft)
        if cfg.parallelism.strategy not in (Strategy.auto, Strategy.single, Strategy.ddp):
            raise ConfigError(
                f"peft=qlora runs with parallelism=single or ddp; parallelism={cfg.parallelism.strategy.value} "
                "would need 4-bit weights sharded, which llmft does not do yet."
            )
    if cfg.cluster is None:
        settle_strategy(cfg, cfg.launch.nproc)
    if cfg.launch.nproc > 1 and cfg.parallelism.strategy == Strategy.single and cfg.cluster is None:
        raise ConfigError(
            f"launch.nproc={cfg.launch.nproc} needs a distributed strategy: add parallelism=ddp (or fsdp, zero2, zero3)."
        )
    if not check_paths:
        return
    data_path = Path(os.path.expandvars(cfg.data.path)).expanduser()
    if not data_path.exists():
        raise ConfigError(f"data.path={cfg.data.path} does not exist: point data.path at your data file or folder.")
    problem = model_path_problem(cfg)
    if problem:
        raise ConfigError(problem + ".")


def settle_strategy(cfg: DictConfig, world_size: int) -> None:
    """Replace parallelism=auto by the strategy for this number of ranks (in cfg, so the run directory records it)."""
    if cfg.parallelism.strategy != Strategy.auto:
        return
    if world_size == 1:
        cfg.parallelism.strategy = Strategy.single
    else:
        cfg.parallelism.strategy = Strategy.fsdp if cfg.peft.method == PeftMethod.full else Strategy.ddp


def model_path_problem(cfg: DictConfig) -> Optional[str]:
    """Why model.path cannot be loaded (no config.json there), or None."""
    path = cfg.model.path
    if path is None or (Path(os.path.expandvars(path)).expanduser() / "config.json").is_file():
        return None
    return (f"model.path={path} is not a local Hugging Face model folder (no config.json there): "
            f"copy the model there or set model.path=/path/to/model")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as their names), as written to the run directory."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def load_run_config(run_dir) -> DictConfig:
    """The typed config saved in a run directory (`config.yaml`), validated against the schema again."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is {run_dir} a run directory created by llmft.launch?")
    schema = OmegaConf.structured(LlmftConfig)
    return OmegaConf.merge(schema, OmegaConf.load(path))  # type: ignore[return-value]
