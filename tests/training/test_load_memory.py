"""A ~300M-parameter model written to disk loads under FSDP2 without a full copy per rank in host RAM."""

from __future__ import annotations

import json

import pytest
import torch

from support.runs import REPO
from support.torchrun import train_ranks

pytestmark = pytest.mark.slow


def write_model(folder, num_layers: int, hidden: int, intermediate: int) -> int:
    """A Llama folder (config, bf16 safetensors, tokenizer) with random weights; returns the weights' bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmft.data.tokenize.tokenizer import train_tiny_tokenizer

    samples = REPO / "llmft/data/samples/tickets_sample.chat.jsonl"
    texts = [m["content"] for line in samples.read_text().splitlines() for m in json.loads(line)["messages"]]
    tokenizer = train_tiny_tokenizer(texts, 2048)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=num_layers, num_attention_heads=16, num_key_value_heads=16,
                         tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    # Random bf16 weights (uniform, std 0.02), each tensor cut at a random offset from one random pool: drawing the
    # ~300M values one by one (torch.randn, then scaled and cast) took 10-30 s of this test on 2 cores.
    generator = torch.Generator().manual_seed(0)
    pool = torch.empty(1 << 24, dtype=torch.bfloat16).uniform_(-0.035, 0.035, generator=generator)
    tensors = {}
    for name, shape in shapes.items():
        start = int(torch.randint(0, pool.numel() - shape.numel() + 1, (1,), generator=generator))
        tensors[name] = pool[start:start + shape.numel()].view(shape).clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def model_on_disk(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    model_bytes = write_model(model_dir, num_layers=24, hidden=1024, intermediate=2816)
    assert model_bytes > 550e6  # ~300M parameters in bf16
    return model_dir, model_bytes


def test_fsdp_loads_a_300m_model_within_one_and_a_half_times_its_size(model_on_disk, tmp_path):
    model_dir, model_bytes = model_on_disk
    result = train_ranks(tmp_path / "run", 2, [
        # LoRA on the output layer only: the step's backward stops there (the measure is the load). On an AVX2 CPU,
        # torch's bf16 backward matmul takes its slow path (~1.4 s per 1024x2816 layer): through 24 frozen bf16 layers
        # one step took over 5 minutes.
        "peft.target_modules=[lm_head]",
        "parallelism=fsdp", "model=llama3_2_1b", f"model.path={model_dir}", "model.max_seq_len=128",
        # one micro-batch: each one is a forward through the 24 bf16 layers (~25 s on 2 loaded cores; 8 by default)
        "train.max_steps=1", "train.save_every=0", "train.micro_batch_size=1", "train.grad_accum_steps=1",
        "data.validation_fraction=0",
    ])
    load_mb = result["summary"]["load_host_rss_mb_all_ranks"]
    ratio = load_mb * 2**20 / model_bytes
    print(f"\nFSDP2 load of a {model_bytes / 1e6:.0f} MB model on 2 ranks: {load_mb:.0f} MB host RSS "
          f"({ratio:.2f}x the model)")
    assert ratio <= 1.5
    assert result["kinds"]["num_dtensor"] == result["kinds"]["num_params"]


