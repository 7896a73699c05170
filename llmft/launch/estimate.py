"""Before submitting: will it fit, how many FLOPs, how many GPU-hours, how many requeues. Pure Python, no torch.

Parameter counts come from the model's config (its config.json when the folder is here, else the shape recorded in
the model profile), by its family's layout (llmft/config/families.py: fused projections, biases, norms; GPT-2 and
BLOOM have a plain two-matrix MLP, the others a gated one): no weights are loaded and nothing heavy is imported, so
`plan` answers in a fraction of the time `import torch` takes.

Model-state bytes per parameter follow DeepSpeed's accounting for mixed-precision AdamW, so that full fine-tuning
matches DeepSpeed's own estimators: 2 (bf16 weights) + 18 (2 bf16 grads + 4 fp32 grads + 4 fp32 master weights +
8 Adam moments). With LoRA the frozen weights cost only their storage (2 bytes; QLoRA: ~0.56 for the layers'
weights in 4 bits, 4 for the rest, which PEFT upcasts) and only the adapter (fp32 in PEFT) has gradients and
optimizer states: 4 + 4 + 8 = 16 bytes per trainable parameter.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from llmft.config.families import (CONFIG_DEFAULTS, FIXED_MLP_RATIO, MODEL_TYPES, MULTI_HEAD_ONLY, SIZE_ALIASES,
                                   ModelFamily, family_of, mla_dims, read_model_config, size_key)
from llmft.config.schema import LossHead, ObjectiveKind, Parallelism, PeftMethod
from llmft.config.validation import precomputes_reference
from llmft.training.flops import flops_per_token  # pure Python: no torch

GiB = 2**30


@dataclass
class Arch:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    family: str = "llama"  # a ModelFamily value: the layout of the layers
    head_dim: int | None = None  # None: hidden_size / num_attention_heads
    position_embeddings: int = 0  # rows of a learned position table (GPT-2)

    def __post_init__(self):
        self.family = family_of(self.family)
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of each linear module of one decoder layer, under the family's names (GPT-2 has two
        `c_proj`)."""
        d, i, heads = self.hidden_size, self.intermediate_size, self.num_attention_heads
        q, kv = heads * self.head_dim, self.num_key_value_heads * self.head_dim
        mlp = [("gate_proj", d, i), ("up_proj", d, i), ("down_proj", i, d)]
        if self.family == ModelFamily.gpt2:
            return [("c_attn", d, 3 * d), ("c_proj", d, d), ("c_fc", d, i), ("c_proj", i, d)]
        if self.family == ModelFamily.bloom:
            return [("query_key_value", d, 3 * d), ("dense", d, d), ("dense_h_to_4h", d, i), ("dense_4h_to_h", i, d)]
        if self.family == ModelFamily.phi3:
            return [("qkv_proj", d, q + 2 * kv), ("o_proj", q, d), ("gate_up_proj", d, 2 * i), ("down_proj", i, d)]
        if self.family == ModelFamily.deepseek_v3:  # latent attention, in tiny's proportions (families.mla_dims)
            mla = mla_dims(d, heads)
            return [("q_a_proj", d, mla["q_lora_rank"]),
                    ("q_b_proj", mla["q_lora_rank"], heads * (mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"])),
                    ("kv_a_proj_with_mqa", d, mla["kv_lora_rank"] + mla["qk_rope_head_dim"]),
                    ("kv_b_proj", mla["kv_lora_rank"], heads * (mla["qk_nope_head_dim"] + mla["v_head_dim"])),
                    ("o_proj", heads * mla["v_head_dim"], d)] + mlp
        return [("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d)] + mlp

    def norm_parameters(self) -> int:
        """Weights of one decoder layer's norms (LayerNorms have a bias too)."""
        d = self.hidden_size
        if self.family in (ModelFamily.gpt2, ModelFamily.bloom):
            return 2 * 2 * d
        if self.family == ModelFamily.gemma3:  # four norms around attention and MLP, and q / k norms per head
            return 4 * d + 2 * self.head_dim
        if self.family == ModelFamily.qwen3:
            return 2 * d + 2 * self.head_dim
        if self.family == ModelFamily.deepseek_v3:  # and the norms of the two latent projections
            mla = mla_dims(d, self.num_attention_heads)
            return 2 * d + mla["q_lora_rank"] + mla["kv_lora_rank"]
        return 2 * d

    def outside_layers(self) -> int:
        """Weights outside the decoder layers besides the embeddings and the head: final norm, GPT-2's position
        table, BLOOM's norm after the embeddings."""
        d = self.hidden_size
        if self.family == ModelFamily.gpt2:
            return 2 * d + self.position_embeddings * d
        if self.family == ModelFamily.bloom:
            return 2 * d + 2 * d
        return d


# Families whose config class ties the head to the embeddings when config.json does not say
TIED_BY_DEFAULT = {ModelFamily.gpt2, ModelFamily.bloom, ModelFamily.gemma3}


def arch_from_config_json(config: dict) -> Arch | None:
    """The shape in a config.json, under its family's key names; None for DeepSeek's MoE models (not estimated).
    An unknown model type is read with Llama's layout."""
    family = MODEL_TYPES.get(config.get("model_type", ""), ModelFamily.llama)
    if family == ModelFamily.deepseek_v3:
        return None
    config = {**CONFIG_DEFAULTS.get(family, {}), **config}

    def size(name: str):
        """A size under the family's key, ours, or another name its published files use."""
        for key in (size_key(family, name), name, *SIZE_ALIASES.get(family, {}).get(name, [])):
            if config.get(key) is not None:
                return config[key]
        return None

    hidden, heads = size("hidden_size"), size("num_attention_heads")
    if family in FIXED_MLP_RATIO:
        intermediate = FIXED_MLP_RATIO[family] * hidden
    else:  # GPT-2's n_inner null: 4 x n_embd
        intermediate = size("intermediate_size") or 4 * hidden
    return Arch(
        hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=size("num_hidden_layers"), num_attention_heads=heads,
        num_key_value_heads=heads if family in MULTI_HEAD_ONLY else config.get("num_key_value_heads", heads),
        vocab_size=config["vocab_size"],
        tie_word_embeddings=config.get("tie_word_embeddings", family in TIED_BY_DEFAULT),
        attention_bias=config.get("attention_bias", family == ModelFamily.qwen2), family=family,
        head_dim=config.get("head_dim"), position_embeddings=config.get("n_positions", 0),
    )


def arch_of(model_cfg) -> Arch | None:
    """The model's shape: config.json in model.path if it is here, else the profile's `arch`, else tiny's."""
    config = read_model_config(model_cfg.path)
    if config is not None:
        return arch_from_config_json(config)
    if model_cfg.arch is not None:
        return Arch(**dict(model_cfg.arch))
    if model_cfg.tiny is not None:  # what llmft.training.model.build_tiny_model builds
        tiny, family = model_cfg.tiny, family_of(model_cfg.tiny.family)
        return Arch(
            tiny.hidden_size,
            FIXED_MLP_RATIO[family] * tiny.hidden_size if family in FIXED_MLP_RATIO else tiny.intermediate_size,
            tiny.num_hidden_layers, tiny.num_attention_heads,
            tiny.num_attention_heads if family in MULTI_HEAD_ONLY else tiny.num_key_value_heads,
            tiny.vocab_size, tie_word_embeddings=tiny.tie_word_embeddings, family=family,
            attention_bias=family == ModelFamily.qwen2,  # transformers' Qwen2 has q, k, v biases
            position_embeddings=max(model_cfg.max_seq_len, 256) if family == ModelFamily.gpt2 else 0,
        )
    return None


def layer_parameters(arch: Arch) -> int:
    shapes = arch.linear_shapes()
    linear = sum(i * o for _, i, o in shapes)
    if arch.family in (ModelFamily.gpt2, ModelFamily.bloom):  # a bias on every projection
        bias = sum(o for _, _, o in shapes)
    else:
        bias = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * arch.head_dim if arch.attention_bias else 0
    return linear + bias + arch.norm_parameters()


def arch_parameter_counts(arch: Arch, lora_targets: list[str] | None, rank: int) -> tuple[int, int, int]:
    """(all parameters, trainable parameters, largest layer's parameters). lora_targets None: full fine-tuning."""
    embedding = arch.vocab_size * arch.hidden_size
    total = embedding * (1 if arch.tie_word_embeddings else 2) + arch.num_hidden_layers * layer_parameters(arch) \
        + arch.outside_layers()
    largest = max(embedding, layer_parameters(arch))
    if lora_targets is None:
        return total, total, largest
    lora = arch.num_hidden_layers * sum(rank * (i + o) for name, i, o in arch.linear_shapes() if name in lora_targets)
    return total + lora, lora, largest


def quantized_parameters(arch: Arch) -> int:
    """The weights bitsandbytes stores in 4 bits for QLoRA: the decoder layers' linear projections (not the
    embeddings, the head, the norms or the biases)."""
    return arch.num_hidden_layers * sum(i * o for _, i, o in arch.linear_shapes())


def model_state_bytes(total: int, trainable: int, largest: int, strategy: Parallelism | str, method: PeftMethod | str,
                      world: int, quantized: int = 0) -> dict:
    """Bytes per GPU of weights, gradients and optimizer states (`strategy` settled: not auto; hsdp counts as fsdp
    within its shard group). The strategy and the method may be given by name. `quantized`: for QLoRA, the frozen
    parameters stored in 4 bits (the decoder layers' linear weights, `quantized_parameters`)."""
    strategy, method = Parallelism(strategy), PeftMethod(method)
    frozen = total - trainable if method is not PeftMethod.full else 0
    if method is PeftMethod.qlora:
        # 4 bits + block scales for the layers' linear weights; PEFT's prepare_model_for_kbit_training upcasts every
        # other frozen weight (embeddings, an untied head, norms) to fp32: 4.2 GB for Llama-3-8B, not 0.6
        frozen_bytes = 0.5625 * quantized + 4.0 * (frozen - quantized)
    else:
        frozen_bytes = 2.0 * frozen
    if method is PeftMethod.full:  # DeepSpeed's estimators, component by component
        if strategy in (Parallelism.single, Parallelism.ddp):
            return {"weights": 2 * total, "gradients_and_optimizer": 18 * total}
        if strategy is Parallelism.zero2:
            return {"weights": 2 * total, "gradients_and_optimizer": 18 * total / world}
        gathered_layer = 4 * largest
        if strategy is Parallelism.zero3_offload:  # optimizer states, fp32 master weights and grads on the CPU
            return {"weights": gathered_layer + 2 * total / world, "gradients_and_optimizer": 0.0}
        return {"weights": gathered_layer + 2 * total / world, "gradients_and_optimizer": 16 * total / world}
    sharded = strategy in (Parallelism.fsdp, Parallelism.zero3, Parallelism.zero3_offload)
    weights = frozen_bytes / (world if sharded else 1) + (2 * largest if sharded else 0)
    adapter = 16 * trainable
    if strategy in (Parallelism.zero2, Parallelism.zero3, Parallelism.fsdp):
        adapter = 4 * trainable + 12 * trainable / world
    elif strategy is Parallelism.zero3_offload:
        adapter = 4 * trainable / world
    return {"weights": weights, "gradients_and_optimizer": adapter}


# One chunk of the loss's fp32 logits, in elements: the value of llmft/training/loss.py's CHUNK_ELEMENTS (that module
# imports torch; tests/launch/test_estimate.py checks the two agree).
LOSS_CHUNK_ELEMENTS = 2**26


def activation_bytes(arch: Arch, micro_batch: int, seq_len: int, checkpointing: bool, full_logits: bool = False
                     ) -> float:
    """Activations of one micro-batch: 34 bytes per token per hidden unit per layer (bf16, fused attention,
    Korthikanti et al.); with activation checkpointing, each layer's input plus one layer recomputed. Plus the loss:
    by default (train.loss_head=auto, training/loss.py) one chunk of fp32 logits and its bf16 gradient, and the
    supervised rows' hidden states and their gradient (counted as if every token were supervised); with full logits
    (train.loss_head=full_logits, or a model that soft-caps them), the bf16 logits, their fp32 copy and its gradient
    for every token."""
    tokens = micro_batch * seq_len
    per_layer = 34 * tokens * arch.hidden_size
    layers = (2 * tokens * arch.hidden_size * arch.num_hidden_layers + per_layer) if checkpointing \
        else per_layer * arch.num_hidden_layers
    if full_logits:
        return layers + 10 * tokens * arch.vocab_size
    return layers + 6 * min(LOSS_CHUNK_ELEMENTS, tokens * arch.vocab_size) + 4 * tokens * arch.hidden_size


def uses_full_logits(cfg) -> bool:
    """Whether the loss will need full logits: asked for, or the model's config.json scales them."""
    if cfg.train.loss_head is LossHead.full_logits:
        return True
    if not cfg.model.path:
        return False
    config_file = Path(os.path.expandvars(cfg.model.path)).expanduser() / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    config = {**config, **config.get("text_config", {})}
    return any(config.get(key) not in (None, 1, 1.0)
               for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def preference_objective(cfg) -> bool:
    return cfg.objective.kind in (ObjectiveKind.dpo, ObjectiveKind.kto)


@dataclass
class Estimate:
    total_params: int
    trainable_params: int
    memory: dict  # component -> bytes per GPU
    gpu_memory_gb: float | None
    flops_per_token: float
    tokens_per_step: int

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory_gb is None else self.memory_total <= 0.9 * self.gpu_memory_gb * GiB


def estimate(cfg, world: int, gpu_memory_gb: float | None, ranks_per_node: int | None = None) -> Estimate | None:
    """Per-GPU memory and compute of `cfg` on `world` ranks (`ranks_per_node`: hsdp's default shard group)."""

    arch = arch_of(cfg.model)
    if arch is None:
        return None
    method = cfg.peft.method
    targets = None if method is PeftMethod.full else list(cfg.peft.target_modules or cfg.model.lora_target_modules)
    total, trainable, largest = arch_parameter_counts(arch, targets, cfg.peft.r)
    strategy = cfg.parallelism.strategy
    if strategy is Parallelism.hsdp:  # FSDP within a shard group, replicas across groups
        strategy, world = Parallelism.fsdp, min(world, cfg.parallelism.shard_size or ranks_per_node or world)
    memory = model_state_bytes(total, trainable, largest, strategy, method, world, quantized_parameters(arch))
    # DPO and KTO: two sequences per example (chosen and rejected; the answer and its mismatched KL row)
    sequences = cfg.train.micro_batch_size * (2 if preference_objective(cfg) else 1)
    memory["activations"] = activation_bytes(arch, sequences, cfg.model.max_seq_len,
                                             cfg.train.activation_checkpointing, uses_full_logits(cfg))
    if preference_objective(cfg) and not precomputes_reference(cfg):
        # the reference's forward without gradients (the adapter disabled) before the policy's: at most one layer's
        # activations and one chunk of logits alive at a time, no second copy of the weights
        memory["reference_forward"] = 34 * sequences * cfg.model.max_seq_len * arch.hidden_size + \
            6 * min(LOSS_CHUNK_ELEMENTS, sequences * cfg.model.max_seq_len * arch.vocab_size)
    if method is PeftMethod.full and not uses_full_logits(cfg):  # the head's gradient, made during the loss's forward (fp32)
        memory["activations"] += 4 * arch.vocab_size * arch.hidden_size
    per_token = flops_per_token(total, trainable, arch.num_hidden_layers, arch.hidden_size, cfg.model.max_seq_len,
                                lora=method is not PeftMethod.full)
    if preference_objective(cfg) and not precomputes_reference(cfg):
        per_token *= 4 / 3  # one more forward per step: a third of a forward and backward
    tokens_per_step = sequences * cfg.model.max_seq_len * world * cfg.train.grad_accum_steps
    return Estimate(total, trainable, memory, gpu_memory_gb, per_token, tokens_per_step)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def inference_gpus(cfg, gpu_memory_gb: float, max_gpus: int) -> int:
    """GPUs of one node that the evaluation needs: the weights in model.dtype (the base, plus a full model for
    peft=full) and 30% for activations and the KV cache of batched generation, at 90% of each GPU. 1 when the
    model's shape is unknown (model=tiny is built)."""
    arch = arch_of(cfg.model)
    if arch is None:
        return 1
    total, _, _ = arch_parameter_counts(arch, None, 0)
    copies = 2 if cfg.peft.method is PeftMethod.full and cfg.eval.compare_base else 1
    needed = total * DTYPE_BYTES.get(cfg.model.dtype, 2) * copies * 1.3
    return max(1, min(max_gpus, math.ceil(needed / (0.9 * gpu_memory_gb * GiB))))


def largest_micro_batch(cfg, world: int, gpu_memory_gb: float, limit: int = 256, ranks_per_node: int | None = None
                        ) -> int:
    """The largest train.micro_batch_size that fits (0: not even 1), the rest of the config unchanged."""
    from copy import deepcopy

    def fits(micro_batch: int) -> bool:
        trial = deepcopy(cfg)
        trial.train.micro_batch_size = micro_batch
        return bool(estimate(trial, world, gpu_memory_gb, ranks_per_node).fits)

    if not fits(1):
        return 0
    low, high = 1, limit
    while low < high:  # memory grows with the micro-batch: the largest that fits, by bisection
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def advice(cfg, estimate_: Estimate, world: int = 1, ranks_per_node: int | None = None) -> list[str]:
    """What to change when it does not fit, most effective first."""
    changes = []
    if not cfg.train.activation_checkpointing and estimate_.memory["activations"] > 0.25 * estimate_.memory_total:
        changes.append("train.activation_checkpointing=true")
    if cfg.train.micro_batch_size > 1 and estimate_.gpu_memory_gb:
        fitting = largest_micro_batch(cfg, world, estimate_.gpu_memory_gb, cfg.train.micro_batch_size - 1,
                                      ranks_per_node)
        if fitting:  # the same samples per optimizer step where the numbers divide
            steps = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
            accumulation = steps // fitting if steps % fitting == 0 else math.ceil(steps / fitting)
            changes.append(f"train.micro_batch_size={fitting} train.grad_accum_steps={accumulation}")
    strategy = cfg.parallelism.strategy
    if strategy in (Parallelism.single, Parallelism.ddp, Parallelism.zero2):
        changes.append("parallelism=fsdp (or zero3): shard the weights across GPUs")
    if strategy is Parallelism.hsdp:
        changes.append("parallelism=fsdp: shard over every GPU of every node instead of one node's")
    if strategy is Parallelism.zero3:
        changes.append("parallelism=zero3_offload")
    if cfg.peft.method is PeftMethod.full:
        changes.append("peft=lora")
    elif cfg.peft.method is PeftMethod.lora:
        changes.append("peft=qlora")
    changes.append("more GPUs: cluster.nodes")
    return changes


def hsdp_advice(cfg, world: int, gpu_memory_gb: float | None, ranks_per_node: int) -> str | None:
    """For full fine-tuning sharded over several nodes: HSDP keeps the per-layer all-gathers inside a node (the
    network between nodes is much slower than NVLink) if one node's GPUs hold the model's states."""
    if cfg.peft.method is not PeftMethod.full or cfg.parallelism.strategy is not Parallelism.fsdp \
            or world <= ranks_per_node:
        return None
    from copy import deepcopy

    trial = deepcopy(cfg)
    trial.parallelism.strategy, trial.parallelism.shard_size = Parallelism.hsdp, 0
    result = estimate(trial, world, gpu_memory_gb, ranks_per_node)
    if result is None or result.fits is False:
        return None
    return (f"parallelism=hsdp: full fine-tuning on {world // ranks_per_node} nodes, sharded within each node and "
            f"replicated across nodes, so only gradients cross the slower inter-node network "
            f"({result.memory_total / GiB:.1f} GiB per GPU)")


def gpu_hours(estimate_: Estimate, total_tokens: float, world: int, peak_tflops: float, mfu: float) -> float:
    seconds = total_tokens * estimate_.flops_per_token / (mfu * peak_tflops * 1e12 * world)
    return seconds * world / 3600


def requeues_needed(hours_wall: float, qos_limit_minutes: int) -> int:
    return max(0, math.ceil(hours_wall * 60 / qos_limit_minutes) - 1)
