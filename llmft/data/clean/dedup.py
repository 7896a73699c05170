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
from dataclasses import dataclass

import numpy as np

NUM_PERMUTATIONS = 64
BANDS = 16  # 16 bands of 4 rows: pairs above ~0.5 similarity become candidates, then are checked
SHINGLE_WORDS = 5
_WORD = re.compile(r"\w+")
_rng = np.random.default_rng(20241122)
# Multiply-shift hashing, h(x) = (a * x + b) mod 2**64 >> 32 with odd a: a 2-independent family whose arithmetic wraps
# in uint64 (no division: a modulo by a prime was a third of the signature's time).
_A = _rng.integers(1, 2**63, NUM_PERMUTATIONS, dtype=np.uint64) | np.uint64(1)
_B = _rng.integers(0, 2**63, NUM_PERMUTATIONS, dtype=np.uint64)
_MAX_CACHED_WORDS = 1 << 20


class _WordHashes(dict):
    """crc32 of each word, computed once per word a worker sees (support tickets reuse a small vocabulary)."""

    def __missing__(self, word: str) -> int:
        if len(self) >= _MAX_CACHED_WORDS:
            self.clear()
        value = self[word] = zlib.crc32(word.encode())
        return value


_word_hashes = _WordHashes()


def _text_of(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def minhash(lowered: str) -> np.ndarray:
    """The MinHash signature of a lowercased text's word 5-grams."""
    words = _WORD.findall(lowered) or [""]
    word_hashes = np.fromiter(map(_word_hashes.__getitem__, words), dtype=np.uint64, count=len(words))
    # the hash of a 5-gram combines the hashes of its words (polynomial, mod 2**32): no string per shingle
    count = max(1, len(words) - SHINGLE_WORDS + 1)
    shingles = word_hashes[:count].copy()
    for offset in range(1, min(SHINGLE_WORDS, len(words))):
        shingles *= np.uint64(1_000_003)
        shingles += word_hashes[offset : offset + count]
    shingles &= np.uint64(0xFFFFFFFF)  # (wrapping mod 2**64 then masking: the same low 32 bits as masking each step)
    # the minimum of each permutation (a repeated shingle changes no minimum: no need to make them unique)
    hashed = np.multiply.outer(_A, shingles)
    hashed += _B[:, None]
    hashed >>= np.uint64(32)
    return hashed.min(axis=1)


@dataclass
class DedupKeys:
    """What `Deduplicator` compares, computed where the conversation is cleaned (in a worker)."""

    exact: bytes  # the hash of the text, case and whitespace normalized
    signature: np.ndarray | None = None  # MinHash; None when data.clean.near_duplicate_threshold >= 1 (exact only)
    bands: list[bytes] | None = None  # the signature's bands, the keys of the locality-sensitive hash buckets


def dedup_keys(messages: list[dict[str, str]], threshold: float) -> DedupKeys:
    lowered = _text_of(messages).lower()
    exact = hashlib.sha1(" ".join(lowered.split()).encode()).digest()  # (str.split: the whitespace of regex \s)
    if threshold >= 1.0:
        return DedupKeys(exact)
    signature = minhash(lowered)
    rows = NUM_PERMUTATIONS // BANDS
    return DedupKeys(exact, signature, [bytes([band]) + signature[band * rows : (band + 1) * rows].tobytes()
                                        for band in range(BANDS)])


class Deduplicator:
    """Sees the conversations in input order and says which repeat an earlier one: the first occurrence stays.

    Kept compact for 100k conversations: the signatures in one growing array, a bucket holding one conversation
    as a bare index (most do), a list only from the second."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.seen_exact: set[bytes] = set()
        self.buckets: dict[bytes, int | list[int]] = {}
        self.signatures = np.zeros((256, NUM_PERMUTATIONS), dtype=np.uint64)
        self.num_signatures = 0
        self.dropped = {"exact_duplicate": 0, "near_duplicate": 0}

    def duplicate(self, keys: DedupKeys) -> bool:
        if keys.exact in self.seen_exact:
            self.dropped["exact_duplicate"] += 1
            return True
        self.seen_exact.add(keys.exact)
        if keys.signature is None:
            return False
        candidates: set[int] = set()
        for band in keys.bands:
            members = self.buckets.get(band)
            if members is not None:
                candidates.update((members,) if isinstance(members, int) else members)
        if candidates:
            similarities = np.mean(self.signatures[sorted(candidates)] == keys.signature, axis=1)
            if (similarities >= self.threshold).any():
                self.dropped["near_duplicate"] += 1
                return True
        index = self.num_signatures
        if index == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.zeros_like(self.signatures)])
        self.signatures[index] = keys.signature
        self.num_signatures += 1
        for band in keys.bands:
            members = self.buckets.get(band)
            if members is None:
                self.buckets[band] = index
            elif isinstance(members, int):
                self.buckets[band] = [members, index]
            else:
                members.append(index)
        return False


def drop_duplicates(conversations: list, threshold: float) -> tuple[list, dict[str, int]]:
    """The conversations without duplicates, and how many were dropped as exact and as near duplicates."""
    deduplicator = Deduplicator(threshold)
    kept = [c for c in conversations if not deduplicator.duplicate(dedup_keys(c.messages, threshold))]
    return kept, deduplicator.dropped
