"""Drop exact and near-duplicate conversations (the same ticket exported twice, a thread forwarded again).

Exact: the same text once case and whitespace are normalized. Near: MinHash signatures of word 5-grams, banded
for locality-sensitive hashing, and a candidate pair counts when the estimated Jaccard similarity reaches
`data.clean.near_duplicate_threshold`. The first occurrence (in input order) stays. Hashes are crc32 and a
fixed-seed permutation family, never Python's salted `hash`, so two runs drop exactly the same conversations.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

NUM_PERMUTATIONS = 64
BANDS = 16  # 16 bands of 4 rows: pairs above ~0.5 similarity become candidates, then are checked
SHINGLE_WORDS = 5
_PRIME = np.uint64(4294967311)  # > 2**32, so (a * x) stays below 2**64 for 32-bit a and x
_WORD = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")
_rng = np.random.default_rng(20241122)
_A = _rng.integers(1, 2**32 - 1, NUM_PERMUTATIONS, dtype=np.uint64)
_B = _rng.integers(0, 2**32 - 1, NUM_PERMUTATIONS, dtype=np.uint64)


def _text_of(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def minhash(text: str) -> np.ndarray:
    words = _WORD.findall(text.lower()) or [""]
    word_hashes = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    # the hash of a 5-gram combines the hashes of its words (polynomial, mod 2**32): no string per shingle
    count = max(1, len(words) - SHINGLE_WORDS + 1)
    shingles = np.zeros(count, dtype=np.uint64)
    for offset in range(min(SHINGLE_WORDS, len(words))):
        shingles = (shingles * np.uint64(1_000_003) + word_hashes[offset : offset + count]) & np.uint64(0xFFFFFFFF)
    shingles = np.unique(shingles)
    return (((_A[:, None] * shingles[None, :]) % _PRIME + _B[:, None]) % _PRIME).min(axis=1)


def drop_duplicates(conversations: list, threshold: float) -> tuple[list, dict[str, int]]:
    """The conversations without duplicates, and how many were dropped as exact and as near duplicates."""
    kept, seen_exact = [], set()
    buckets: dict[tuple[int, bytes], list[int]] = {}
    signatures: list[np.ndarray] = []
    dropped = {"exact_duplicate": 0, "near_duplicate": 0}
    rows = NUM_PERMUTATIONS // BANDS
    for conversation in conversations:
        text = _text_of(conversation.messages)
        exact_key = hashlib.sha1(_SPACES.sub(" ", text.lower()).strip().encode()).digest()
        if exact_key in seen_exact:
            dropped["exact_duplicate"] += 1
            continue
        seen_exact.add(exact_key)
        if threshold >= 1.0:
            kept.append(conversation)
            continue
        signature = minhash(text)
        keys = [(band, signature[band * rows : (band + 1) * rows].tobytes()) for band in range(BANDS)]
        candidates = {index for key in keys for index in buckets.get(key, ())}
        if any(np.mean(signatures[index] == signature) >= threshold for index in candidates):
            dropped["near_duplicate"] += 1
            continue
        for key in keys:
            buckets.setdefault(key, []).append(len(signatures))
        signatures.append(signature)
        kept.append(conversation)
    return kept, dropped
