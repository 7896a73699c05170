"""Train / validation / test by a hash of the ticket id.

The split of a ticket is a pure function of its id and the fractions: deterministic across runs and machines,
no ticket in two splits (all the windows of a long ticket follow it), and adding tickets never moves old ones.
"""

from __future__ import annotations

import hashlib


def bucket_of(conversation_id: str) -> float:
    """A number in [0, 1), uniform over ids and fixed for each id."""
    return int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") / 2**64


def split_of(conversation_id: str, validation_fraction: float, test_fraction: float = 0.0) -> str:
    bucket = bucket_of(conversation_id)
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + validation_fraction:
        return "validation"
    return "train"
