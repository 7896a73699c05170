"""A model whose head is tied to its embedding (Llama 3.2 1B / 3B, SmolLM2, Gemma, Qwen2.5 small) stays tied when
DDP and ZeRO-2 build it on meta and rank 0 reads the weights (issue 28 item 4): full fine-tuning trains one tensor,
and the final folder, read by stock transformers, gives the logits of the model that trained."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from support.runs import REPO
from support.torchrun import FROM_DISK, train_ranks_batch

pytestmark = pytest.mark.slow


def write_tied_model(folder) -> None:
    """A small Llama folder with tie_word_embeddings=true: its safetensors hold the embedding only, as real ones do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmft.data.tokenize.tokenizer import train_tiny_tokenizer

    samples = REPO / "llmft/data/samples/tickets_sample.chat.jsonl"
    texts = [m["content"] for line in samples.read_text().splitlines() for m in json.loads(line)["messages"]]
    tokenizer = train_tiny_tokenizer(texts, 512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_tied_head_trains_as_one_tensor_under_ddp_and_zero2(tmp_path):
    from transformers import AutoModelForCausalLM

    from support.torchrun_harness import PROBE_IDS

    model_dir = tmp_path / "model"
    write_tied_model(model_dir)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
        base_embedding = f.get_tensor("model.embed_tokens.weight")
    overrides = FROM_DISK + ["peft=full", f"model.path={model_dir}", "train.max_steps=2", "train.save_every=0",
                             "train.eval_every=2", "train.lr=1e-2"]
    runs = {tmp_path / strategy: overrides + [f"parallelism={strategy}"] for strategy in ("ddp", "zero2")}
    results = train_ranks_batch(2, runs)
    for run_dir, result in results.items():
        final = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
        head, embedding = final.get_output_embeddings().weight, final.get_input_embeddings().weight
        assert head.data_ptr() == embedding.data_ptr(), run_dir.name
        assert not torch.equal(embedding, base_embedding), run_dir.name  # trained
        with safe_open(run_dir / "final" / "model.safetensors", "pt") as f:  # one tensor, or two equal ones
            if "lm_head.weight" in f.keys():
                assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
        with torch.no_grad():
            logits = final(input_ids=torch.tensor(PROBE_IDS)).logits
        # untied, the trained head differs from the embedding the folder keeps: logits off by the update (~1e-1)
        assert torch.allclose(logits, result["logits"].float(), atol=1e-4), (run_dir.name, float(
            (logits - result["logits"].float()).abs().max()))
