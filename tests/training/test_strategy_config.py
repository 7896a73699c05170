"""Unit tests of what the strategies are configured with: QLoRA translation, the generated DeepSpeed config,
the FLOPs count behind MFU, and the topology read from launcher variables."""

from __future__ import annotations

import json

import pytest
import torch

from llmft.config.compose import compose
from llmft.config.validation import validate
from llmft.errors import ConfigError
from llmft.training.flops import flops_per_token, peak_flops
from llmft.training.model import quantization_kwargs
from llmft.training.strategies.fsdp import rows_of_rank
from llmft.training.strategies.deepspeed import deepspeed_config
from llmft.training.topology import Topology


def test_qlora_config_translates_to_bitsandbytes():
    from transformers import BitsAndBytesConfig

    cfg = compose(["peft=qlora", "model=mistral_7b", "peft.compute_dtype=float16", "peft.double_quant=false"])
    kwargs = quantization_kwargs(cfg.peft)
    assert kwargs == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
                      "bnb_4bit_compute_dtype": "float16"}
    bnb = BitsAndBytesConfig(**kwargs)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4"


@pytest.mark.parametrize("override,key", [
    ("peft.quant_type=int3", "peft.quant_type"),
    ("peft.compute_dtype=float8", "peft.compute_dtype"),
    ("parallelism=fsdp", "parallelism=fsdp"),
])
def test_bad_qlora_settings_are_refused_before_anything_runs(override, key):
    cfg = compose(["peft=qlora", "model=mistral_7b", override])
    with pytest.raises(ConfigError, match=key):
        validate(cfg, check_paths=False)


def test_deepspeed_config_is_generated_from_ours(tmp_path):
    cfg = compose(["parallelism=zero3_offload", "train.micro_batch_size=2", "train.grad_accum_steps=4",
                   "train.max_grad_norm=0.5", "parallelism.zero3_param_persistence_threshold=0"])
    config = deepspeed_config(cfg, world_size=8, compute=torch.bfloat16)
    assert config["train_batch_size"] == 2 * 4 * 8
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True}
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert deepspeed_config(compose(["parallelism=zero2"]), 2, None)["zero_optimization"] == {"stage": 2}

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7}, "bf16": {"enabled": False}}))
    merged = deepspeed_config(compose(["parallelism=zero2", f"parallelism.deepspeed_config={user}"]), 2, torch.bfloat16)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5e7}  # merged, not replaced
    assert merged["bf16"] == {"enabled": False}


def test_flops_per_token_follow_the_lora_aware_formula():
    # Llama-3-8B, T = 4096: FlopCounterMode measured 51.47 GFLOP/token full and 36.66 with LoRA r16 (ratio 0.71)
    n, n_lora, layers, d, t = 8.03e9, 42e6, 32, 4096, 4096
    full = flops_per_token(n, n, layers, d, t, lora=False)
    lora = flops_per_token(n, n_lora, layers, d, t, lora=True)
    assert full == 6 * n + 12 * layers * d * t
    assert full == pytest.approx(51.47e9, rel=0.07)
    assert lora / full == pytest.approx(0.71, abs=0.02)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None


def test_topology_comes_from_torchrun_or_slurm_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NNODES", "4")
    topology = Topology.from_env()
    assert (topology.rank, topology.world_size, topology.local_rank, topology.num_nodes) == (5, 16, 1, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Topology.from_env().world_size == 2 and not Topology.from_env().is_main


def test_shard_rows_follow_torch_chunk():
    import torch

    for rows in (1, 7, 8, 2049):
        for world in (1, 2, 3, 8):
            chunks = torch.arange(rows).chunk(world)
            for rank in range(world):
                start, end = rows_of_rank(rows, world, rank)
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(start, end)) == expected


def test_trained_weights_are_kept_in_float32_frozen_ones_in_the_model_dtype():
    from llmft.training.model import weights_dtype

    assert weights_dtype(compose(["model=llama7b", "peft=full"]).model, compose(["peft=full"]).peft) == "float32"
    assert weights_dtype(compose(["model=llama7b"]).model, compose(["peft=lora"]).peft) == "bfloat16"
