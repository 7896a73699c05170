"""Pack samples into rows of a fixed number of tokens, best fit decreasing.

Samples are placed longest first, each into the row whose free space fits it most tightly (a new row when none
does): on chat data this fills rows to well over 95% where padding each sample to the sequence length wastes most
of the batch. A row remembers the lengths of its samples; `batching.collate` turns them into position ids that
restart at each sample, from which the model builds a block-diagonal causal mask, so no token attends across
samples (tests/data/test_packing.py checks that a sample's logits are the same packed and alone).
"""

from __future__ import annotations

import bisect

from llmft.data.tokenize.templating import Sample


def pack_best_fit(samples: list[Sample], capacity: int) -> list[Sample]:
    packed = []
    for row in pack_rows([len(s.input_ids) for s in samples], capacity):
        members = [samples[i] for i in row]
        packed.append(Sample(
            input_ids=[t for s in members for t in s.input_ids],
            labels=[t for s in members for t in s.labels],
            seq_lengths=[len(s.input_ids) for s in members],
        ))
    return packed


def pack_rows(lengths, capacity: int) -> list[list[int]]:
    """The rows of a best-fit-decreasing packing of samples of these lengths: the indices of each row's samples."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"a sample of {length} tokens does not fit a row of {capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([index])
            if capacity > length:
                bisect.insort(free, (capacity - length, len(rows) - 1))
            continue
        space, row = free.pop(slot)
        rows[row].append(index)
        if space > length:  # a full row leaves the search
            bisect.insort(free, (space - length, row))
    return rows
