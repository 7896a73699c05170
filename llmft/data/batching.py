"""Samples to padded batches, in an order that is a pure function of (seed, epoch).

The order being a function of the seed and the epoch makes the data position a pair of integers
(epoch, batches consumed), which a checkpoint stores so a resumed run continues with the exact next batch.
Padding is masked by position (attention_mask, labels), never by token id.

`collate` returns the model's inputs plus `labels` and `num_tokens` (real, non-padding tokens, for throughput);
the training loop passes every other key to the model.
"""

from __future__ import annotations

import random

from llmft.data.templating import IGNORE_INDEX, Sample


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_samples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def collate(samples: list[Sample], pad_token_id: int) -> dict:
    import torch

    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        attention_mask[row, :n] = 1
    num_tokens = torch.tensor(sum(len(s.input_ids) for s in samples))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "num_tokens": num_tokens}
