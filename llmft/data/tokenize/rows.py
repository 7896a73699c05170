"""The samples of one split as flat int32 arrays: how `prepare` holds a large export in memory.

As Python lists, a token costs 44 to 72 bytes (an int object and its pointer in `input_ids`, a pointer or another
int in `labels`): 1.7 to 2.8 GB for the 39 million tokens of a 100,000-ticket export, before packing copies them.
As int32 arrays it costs 8 bytes, and packing, the counts and the Arrow table are array operations. Training still
gets `Sample` lists (`samples`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from llmft.data.tokenize.packing import pack_rows
from llmft.data.tokenize.templating import IGNORE_INDEX, Sample

_MAX_ARROW_LIST_VALUES = 2**31 - 1  # an Arrow list<int32> column has int32 offsets: a longer column is chunked


def _starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


@dataclass
class Rows:
    input_ids: np.ndarray  # int32: every token, row after row
    labels: np.ndarray  # int32: IGNORE_INDEX outside assistant turns
    sample_lengths: np.ndarray  # int64: the length of each sample, in the order they are laid out
    samples_per_row: np.ndarray | None = None  # packed: how many samples each row holds; None: one sample a row

    @classmethod
    def empty(cls) -> Rows:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64))

    @classmethod
    def concatenate(cls, parts: list[Rows]) -> Rows:
        """Unpacked rows, end to end."""
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.input_ids for p in parts]), np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.sample_lengths for p in parts]))

    def __len__(self) -> int:
        return len(self.sample_lengths) if self.samples_per_row is None else len(self.samples_per_row)

    @property
    def num_samples(self) -> int:
        return len(self.sample_lengths)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))

    def row_lengths(self) -> np.ndarray:
        if self.samples_per_row is None:
            return self.sample_lengths
        return np.add.reduceat(self.sample_lengths, _starts(self.samples_per_row)) if len(self) else \
            np.zeros(0, np.int64)

    def packed(self, capacity: int) -> Rows:
        """The samples packed best fit into rows of `capacity` tokens (packing.pack_rows: the rows of
        `pack_best_fit`)."""
        assert self.samples_per_row is None, "already packed"
        rows = pack_rows(self.sample_lengths.tolist(), capacity)
        order = [i for row in rows for i in row]
        starts, ends = _starts(self.sample_lengths).tolist(), np.cumsum(self.sample_lengths).tolist()
        # one view per sample, then one copy: no index array of every token (8 bytes a token, twice)
        input_ids = np.concatenate([self.input_ids[starts[i] : ends[i]] for i in order] or [self.input_ids[:0]])
        labels = np.concatenate([self.labels[starts[i] : ends[i]] for i in order] or [self.labels[:0]])
        return Rows(input_ids, labels, self.sample_lengths[order],
                    np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows)))

    def fingerprint(self) -> str:
        """A hash of the arrays, read in place."""
        digest = hashlib.sha256()
        for array in (self.input_ids, self.labels, self.sample_lengths, self.samples_per_row):
            digest.update(b"-" if array is None else np.ascontiguousarray(array).data)
        return digest.hexdigest()[:16]

    def samples(self) -> list[Sample]:
        """The rows as `Sample`s (seq_lengths set when packed), for training."""
        ids, labels = self.input_ids.tolist(), self.labels.tolist()
        ends = np.cumsum(self.row_lengths()).tolist()
        if self.samples_per_row is None:
            return [Sample(ids[start:end], labels[start:end]) for start, end in zip([0] + ends, ends)]
        lengths = self.sample_lengths.tolist()
        member_ends = np.cumsum(self.samples_per_row).tolist()
        return [Sample(ids[start:end], labels[start:end], lengths[first:last])
                for start, end, first, last in zip([0] + ends, ends, [0] + member_ends, member_ends)]

    def arrow_table(self, schema):
        """input_ids, labels and seq_lengths (one length a row when not packed) as an Arrow table of `schema`, made
        from the arrays without a Python list."""
        import pyarrow as pa

        members = self.samples_per_row if self.samples_per_row is not None else np.ones(len(self), np.int64)
        row_offsets = np.concatenate([[0], np.cumsum(self.row_lengths())]).astype(np.int64)
        member_offsets = np.concatenate([[0], np.cumsum(members)]).astype(np.int64)
        bounds = [0]  # batches of rows whose tokens fit int32 offsets: one batch unless 2**31 tokens
        while bounds[-1] < len(self):
            end = int(np.searchsorted(row_offsets, row_offsets[bounds[-1]] + _MAX_ARROW_LIST_VALUES, "right")) - 1
            bounds.append(max(end, bounds[-1] + 1))
        if len(bounds) == 1:
            bounds.append(0)  # no row: one empty batch
        columns: dict[str, list] = {"input_ids": [], "labels": [], "seq_lengths": []}
        for first, last in zip(bounds, bounds[1:]):
            tokens = slice(row_offsets[first], row_offsets[last])
            token_offsets = pa.array((row_offsets[first : last + 1] - row_offsets[first]).astype(np.int32))
            member_slice = slice(member_offsets[first], member_offsets[last])
            lengths_offsets = pa.array((member_offsets[first : last + 1] - member_offsets[first]).astype(np.int32))
            columns["input_ids"].append(pa.ListArray.from_arrays(token_offsets, pa.array(self.input_ids[tokens])))
            columns["labels"].append(pa.ListArray.from_arrays(token_offsets, pa.array(self.labels[tokens])))
            columns["seq_lengths"].append(pa.ListArray.from_arrays(
                lengths_offsets, pa.array(self.sample_lengths[member_slice].astype(np.int32))))
        return pa.Table.from_arrays([pa.chunked_array(columns[field.name], type=field.type) for field in schema],
                                    schema=schema)
