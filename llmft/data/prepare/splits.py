"""Train / validation / test by a hash of the ticket id.

The split of a ticket is a pure function of its id and the fractions: deterministic across runs and machines,
no ticket in two splits (all the windows of a long ticket follow it), and adding tickets never moves old ones.
A reader may pin a conversation to a split by the end of its id (records.PINNED_TO_TRAIN, PINNED_HELD_OUT: the
acronyms held out by phrasing, the control acronyms never trained).
"""

from __future__ import annotations

import hashlib

from llmft.config.data_schema import DataFormat
from llmft.data.prepare.data_config import format_of, plain
from llmft.data.prepare.mixture import mixture_splits
from llmft.data.readers.records import PINNED_HELD_OUT, PINNED_TO_TRAIN


def bucket_of(conversation_id: str) -> float:
    """A number in [0, 1), uniform over ids and fixed for each id."""
    return int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") / 2**64


def split_of(conversation_id: str, validation_fraction: float, test_fraction: float = 0.0) -> str:
    if conversation_id.endswith(PINNED_TO_TRAIN):
        return "train"
    if conversation_id.endswith(PINNED_HELD_OUT):
        return "test" if test_fraction > 0 else "validation"
    bucket = bucket_of(conversation_id)
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + validation_fraction:
        return "validation"
    return "train"


def assign_splits(conversation_ids: list[str], data_cfg) -> dict[str, str]:
    """Split of each id by hash. When that leaves validation empty (tiny data), the id with the lowest hash among
    the training ids is held out, so a run always has something to evaluate on, unless
    data.validation_fraction=0 asks to train on every ticket (and evaluate on eval.file). A mixture splits each
    source's conversations by their own ids and that source's fractions, as alone."""
    if format_of(data_cfg) is DataFormat.mixture:
        return mixture_splits(conversation_ids, plain(data_cfg), assign_splits)
    validation_fraction, test_fraction = data_cfg.validation_fraction, data_cfg.test_fraction  # (once: OmegaConf)
    splits = {i: split_of(i, validation_fraction, test_fraction) for i in conversation_ids}
    if "validation" not in splits.values() and validation_fraction > 0:
        moved = validation_fallback([i for i, split in splits.items() if split == "train"])
        if moved is not None:
            splits[moved] = "validation"
    return splits


def validation_fallback(train_ids: list[str]) -> str | None:
    """The training id held out when no id hashed into validation: the lowest hash of those not pinned to train,
    when there are at least two."""
    candidates = [i for i in train_ids if not i.endswith(PINNED_TO_TRAIN)]
    return min(candidates, key=bucket_of) if len(candidates) > 1 else None
