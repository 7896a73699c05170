"""Packing: rows filled best fit, and a sample's logits the same packed and alone (no attention across samples)."""

from __future__ import annotations

import random

import pytest
import torch

from llmft.data.tokenize.batching import collate
from llmft.data.tokenize.packing import pack_best_fit
from llmft.data.tokenize.templating import IGNORE_INDEX, Sample


def random_samples(lengths: list[int], vocab_size: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for n in lengths:
        ids = [rng.randrange(1, vocab_size) for _ in range(n)]
        samples.append(Sample(ids, [IGNORE_INDEX] + ids[1:]))
    return samples


def test_best_fit_keeps_every_sample_once_and_never_overflows_a_row():
    rng = random.Random(1)
    samples = random_samples([rng.randrange(5, 500) for _ in range(300)], 50)
    rows = pack_best_fit(samples, 512)
    assert all(len(row.input_ids) <= 512 and sum(row.seq_lengths) == len(row.input_ids) for row in rows)
    assert sorted(n for row in rows for n in row.seq_lengths) == sorted(len(s.input_ids) for s in samples)
    assert sum(len(s.input_ids) for s in samples) / (len(rows) * 512) > 0.95  # what packing is for
    assert pack_best_fit(samples, 512) == rows  # deterministic


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_logits_are_the_same_packed_and_alone(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn_implementation, use_cache=False)
    model = LlamaForCausalLM(config).eval()
    samples = random_samples([37, 90, 12, 64, 51, 23, 80], config.vocab_size)
    rows = pack_best_fit(samples, 128)
    assert any(len(row.seq_lengths) > 1 for row in rows)
    batch = collate(rows, pad_token_id=0)
    assert "attention_mask" not in batch  # the block-diagonal mask comes from the restarting position ids
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}).logits
        flat = collate(rows, pad_token_id=0, flatten=True)
        flat_logits = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
        flat_start = 0
        for r, row in enumerate(rows):
            start = 0
            for length in row.seq_lengths:
                ids = torch.tensor([row.input_ids[start : start + length]])
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(packed_logits[r, start : start + length], alone, rtol=0, atol=1e-5)
                torch.testing.assert_close(flat_logits[flat_start : flat_start + length], alone, rtol=0, atol=1e-5)
                start += length
                flat_start += length


def test_collate_positions_labels_and_token_counts():
    samples = random_samples([3, 2, 4], 50)
    rows = pack_best_fit(samples, 6)  # [4, 2] and [3]
    batch = collate(rows, pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]  # padding: a block of its own
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 3
    assert int(batch["num_tokens"]) == 9
    # the first token of every sample is never a target, so no sample is trained to follow the previous one
    assert batch["labels"][0, 0] == IGNORE_INDEX and batch["labels"][0, 4] == IGNORE_INDEX
    flat = collate(rows, pad_token_id=0, flatten=True)
    assert flat["input_ids"].shape == (1, 9) and flat["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    unpacked = collate(samples, pad_token_id=0)
    assert unpacked["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
