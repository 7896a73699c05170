"""Load (or build) the base model and put the PEFT method on it.

The order in which a run wraps its model is fixed and lives in train.py: load -> PEFT -> activation checkpointing
-> shard. This module does the first two.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmft.config import ConfigError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def build_tiny_model(tiny_cfg, tokenizer, seed: int, max_seq_len: int):
    """A small Llama with seeded random weights, sized to the run's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size,
        num_hidden_layers=tiny_cfg.num_hidden_layers,
        num_attention_heads=tiny_cfg.num_attention_heads,
        num_key_value_heads=tiny_cfg.num_key_value_heads,
        max_position_embeddings=max(max_seq_len, 256),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=tiny_cfg.initializer_range,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_pretrained_model(model_cfg):
    """A local Hugging Face folder, read with `local_files_only` (compute nodes are offline)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(os.path.expandvars(model_cfg.path)).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(
            f"model.path={model_cfg.path} is not a Hugging Face model folder (no config.json): "
            "point model.path at a local copy of the model."
        )
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, DTYPES[model_cfg.dtype]),
        local_files_only=True,
        attn_implementation=model_cfg.attn_implementation,
    )


def apply_peft(model, peft_cfg, model_cfg):
    """LoRA adapters on the target modules, or every weight trainable for full fine-tuning."""
    method = str(getattr(peft_cfg.method, "value", peft_cfg.method))
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "qlora":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("peft=qlora needs a CUDA GPU (bitsandbytes 4-bit); on this machine use peft=lora.")
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=list(peft_cfg.target_modules or model_cfg.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
