"""The model families llmft knows by name: what `model.tiny.family` builds, the LoRA targets each family gets when
`peft.target_modules` is unset, and the names its config.json gives the sizes. Pure data, no torch: the launcher,
`plan` and the validation read it on the login node; llmft/training/model.py builds the models.

The LoRA targets cover attention and MLP, by each family's own module names
(transformers' modelling files): GPT-2 fuses q, k, v into `c_attn` and names both output projections `c_proj`; BLOOM
fuses them into `query_key_value`; Phi-3 fuses q, k, v into `qkv_proj` and gate and up into `gate_up_proj`;
DeepSeek's multi-head latent attention projects through low-rank `q_a_proj`/`q_b_proj` and
`kv_a_proj_with_mqa`/`kv_b_proj`.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path

from omegaconf import OmegaConf


class ModelFamily(str, Enum):
    llama = "llama"
    mistral = "mistral"
    qwen2 = "qwen2"
    qwen3 = "qwen3"
    gemma3 = "gemma3"
    phi3 = "phi3"
    gpt2 = "gpt2"
    bloom = "bloom"
    # DeepSeek-V3's architecture (multi-head latent attention) with every layer dense: transformers' DeepseekV3 with
    # first_k_dense_replace = num_hidden_layers (the real V3/R1 are MoE after their first 3 layers).
    deepseek_v3 = "deepseek_v3"


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LORA_TARGETS: dict[ModelFamily, list[str]] = {
    ModelFamily.llama: LLAMA_TARGETS,
    ModelFamily.mistral: LLAMA_TARGETS,
    ModelFamily.qwen2: LLAMA_TARGETS,
    ModelFamily.qwen3: LLAMA_TARGETS,
    ModelFamily.gemma3: LLAMA_TARGETS,
    ModelFamily.phi3: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ModelFamily.gpt2: ["c_attn", "c_proj", "c_fc"],  # c_proj: the attention's output and the MLP's
    ModelFamily.bloom: ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    # PEFT >= 0.22 keeps a dense DeepSeek's gate_proj / up_proj / down_proj as modules (0.21 rewrote them into the
    # fused MoE expert parameters of transformers 5, which a dense model does not have: pyproject.toml's pin).
    ModelFamily.deepseek_v3: ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
                              "up_proj", "down_proj"],
}

# config.json's `model_type` -> family (a multimodal Gemma 3 folder says gemma3, its text model gemma3_text)
MODEL_TYPES: dict[str, ModelFamily] = {family.value: family for family in ModelFamily} | {
    "gemma3_text": ModelFamily.gemma3}

# Our size names -> the family's config keys, where they differ (GPT-2: n_embd, n_inner, n_layer, n_head; BLOOM:
# n_layer, n_head). GPT-2, BLOOM and DeepSeek's latent attention have no grouped-query attention (as many key/value
# heads as heads), and BLOOM's MLP is always 4 x hidden_size (no config key): for them `num_key_value_heads`, and for
# BLOOM `intermediate_size`, do not apply.
SIZE_KEYS: dict[ModelFamily, dict[str, str]] = {
    ModelFamily.gpt2: {"hidden_size": "n_embd", "intermediate_size": "n_inner", "num_hidden_layers": "n_layer",
                       "num_attention_heads": "n_head"},
    ModelFamily.bloom: {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"},
}
# Other names a published config.json uses (BigScience's own BLOOM files: n_embed, num_attention_heads)
SIZE_ALIASES: dict[ModelFamily, dict[str, list[str]]] = {
    ModelFamily.bloom: {"hidden_size": ["n_embed"]},
}
# What a config.json may leave to its config class's defaults: Gemma 3's multimodal files give their text_config's
# sizes only where they differ from Gemma3TextConfig's (transformers 5.24 defaults: the 4B's attention and vocabulary)
CONFIG_DEFAULTS: dict[ModelFamily, dict] = {
    ModelFamily.gemma3: {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208},
}
MULTI_HEAD_ONLY = {ModelFamily.gpt2, ModelFamily.bloom, ModelFamily.deepseek_v3}  # key/value heads = heads
# Positions from ALiBi over the attention mask, not from position_ids: packed samples (told apart by their
# position_ids) would attend to each other.
NO_POSITION_IDS = {ModelFamily.bloom}
EAGER_ATTENTION_ONLY = {ModelFamily.bloom}  # transformers has no SDPA (nor flash) attention for BLOOM
FIXED_MLP_RATIO = {ModelFamily.bloom: 4}  # intermediate size = ratio x hidden size


def size_key(family: ModelFamily, name: str) -> str:
    """The family's config key for one of our size names (hidden_size, num_hidden_layers, ...)."""
    return SIZE_KEYS.get(family, {}).get(name, name)


def mla_dims(hidden_size: int, num_attention_heads: int) -> dict[str, int]:
    """The multi-head latent attention sizes of a tiny DeepSeek, in DeepSeek-V3's proportions (per head: a no-rope
    query/key part as wide as the head, a rotary part half as wide, values as wide as the head; latent ranks of half
    the hidden size)."""
    head_dim = hidden_size // num_attention_heads
    return {"q_lora_rank": hidden_size // 2, "kv_lora_rank": hidden_size // 2, "qk_nope_head_dim": head_dim,
            "qk_rope_head_dim": head_dim // 2, "v_head_dim": head_dim}


def family_of(value: ModelFamily | str) -> ModelFamily:
    """A family from its name (config.json's, an interpolation's argument) or itself."""
    return ModelFamily(value)


def read_model_config(model_path: str | None) -> dict | None:
    """config.json of a local model folder, its text model's keys merged in (multimodal Gemma 3), or None."""
    if not model_path:
        return None
    config_file = Path(os.path.expandvars(model_path)).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return {**config, **config.get("text_config", {})} if "text_config" in config else config


def model_family(model_cfg) -> ModelFamily | None:
    """The family of the model a config names: model=tiny's, else config.json's model_type when the folder is here,
    else the profile's `arch`; None for a model type llmft does not know by name."""
    if model_cfg.path is None:
        return family_of(model_cfg.tiny.family) if model_cfg.tiny is not None else None
    config = read_model_config(model_cfg.path)
    if config is not None:
        return MODEL_TYPES.get(config.get("model_type", ""))
    return family_of(model_cfg.arch.family) if model_cfg.arch is not None else None


def _lora_targets_resolver(family) -> list[str]:
    return list(LORA_TARGETS[family_of(family)])


if not OmegaConf.has_resolver("llmft_lora_targets"):
    # `${llmft_lora_targets:${.tiny.family}}` (conf/model/tiny.yaml): the family's targets, unless the command line
    # sets model.lora_target_modules or peft.target_modules.
    OmegaConf.register_new_resolver("llmft_lora_targets", _lora_targets_resolver)
