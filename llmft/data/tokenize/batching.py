"""Samples to batches, in an order that is a pure function of (seed, epoch).

The order being a function of the seed and the epoch makes the data position a pair of integers
(epoch, batches consumed), which a checkpoint stores so a resumed run continues with the exact next batch.

`collate` returns the model's inputs plus `labels` and `num_tokens` (real, non-padding tokens, for throughput);
the training loop passes every other key to the model. Padding is masked by position (labels), never by token id.

- Unpacked samples: right padding and a 2D `attention_mask`.
- Packed rows (`Sample.seq_lengths`): `position_ids` restart at 0 at each sample and there is no
  `attention_mask`. From position ids that restart, transformers (>= 4.54, `masking_utils.
  find_packed_sequence_indices`) builds a block-diagonal causal mask for SDPA, eager and flex attention. The
  padding at the end of a row restarts its positions too, so it is a block of its own that nothing attends to.
  transformers only looks for restarting positions when the model runs without a KV cache: the model must have
  `config.use_cache = False` (training/model.py sets it), or be called with `use_cache=False`.
- `flatten=True`, for flash-attention: all rows laid end to end in one row of shape (1, tokens) without padding,
  with the sample boundaries its varlen kernel takes (`cu_seq_lens_q/k`, int32 offsets, and `max_length_q/k`, the
  longest sample as a Python int), made here on the host: given them, transformers does not infer them from the
  positions in every layer (a device sync each). Without flattening, a batch of several packed rows on
  flash-attention would let samples of a row attend to each other.
"""

from __future__ import annotations

import functools
import random

from llmft.data.tokenize.templating import IGNORE_INDEX, Sample


@functools.lru_cache(maxsize=4)  # the loop asks once per sample; callers must not modify the list
def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_samples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def position_ids_of(sample: Sample) -> list[int]:
    lengths = sample.seq_lengths or [len(sample.input_ids)]
    return [position for length in lengths for position in range(length)]


def collate(samples: list[Sample], pad_token_id: int, flatten: bool = False) -> dict:
    import torch

    num_tokens = torch.tensor(sum(len(s.input_ids) for s in samples))
    packed = flatten or any(s.seq_lengths for s in samples)
    if flatten:
        rows = [[t for s in samples for t in s.input_ids]]
        row_labels = [[t for s in samples for t in s.labels]]
        row_positions = [[p for s in samples for p in position_ids_of(s)]]
    else:
        rows = [s.input_ids for s in samples]
        row_labels = [s.labels for s in samples]
        row_positions = [position_ids_of(s) for s in samples]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for index, (row, row_label, positions) in enumerate(zip(rows, row_labels, row_positions)):
        n = len(row)
        input_ids[index, :n] = torch.tensor(row)
        labels[index, :n] = torch.tensor(row_label)
        attention_mask[index, :n] = 1
        position_ids[index, :n] = torch.tensor(positions)
        position_ids[index, n:] = torch.arange(length - n)  # padding: a block of its own
    if flatten:
        lengths = [length for s in samples for length in (s.seq_lengths or [len(s.input_ids)])]
        offsets = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "num_tokens": num_tokens,
                "cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": max(lengths),
                "max_length_k": max(lengths)}
    if packed:
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "num_tokens": num_tokens}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "num_tokens": num_tokens}
