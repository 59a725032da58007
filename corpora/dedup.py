"""Duplicate removal for `corpora prepare`: exact (a set of 128-bit hashes) and near (MinHash LSH).

Near duplicates use the `datasketch` library (MinHash over character 5-grams, MinHashLSH banding):
Chinese has no spaces, so character n-grams stand in for word shingles. Signatures are computed in
the per-file worker processes and stored with the cleaned text, so the single-process dedup pass only
does the LSH look-ups. The first occurrence in input order wins, which makes the result deterministic.
Memory grows with the number of kept documents: 16 bytes (+ set overhead) each for exact dedup, and the
LSH band hashes for near dedup.
"""
from __future__ import annotations

import hashlib

import numpy as np

NUM_PERM = 128
NGRAM = 5
SEED = 1
# pinned so stored signatures stay comparable across datasketch releases (its default may change)
SCHEME = "affine32"


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        """True if seen before; otherwise remembers it."""
        k = text_key(text)
        if k in self._seen:
            return True
        self._seen.add(k)
        return False

    def __len__(self) -> int:
        return len(self._seen)


def _shingles(text: str, n: int = NGRAM) -> list[bytes]:
    s = "".join(text.split())  # whitespace differences should not make near duplicates look different
    if len(s) <= n:
        return [s.encode("utf-8")]
    return [s[i:i + n].encode("utf-8") for i in range(len(s) - n + 1)]


def signature(text: str, num_perm: int = NUM_PERM) -> bytes:
    """MinHash signature of a document as raw uint32 bytes (datasketch keeps values below 2**32)."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME)
    m.update_batch(_shingles(text))
    return np.asarray(m.hashvalues, dtype=np.uint32).tobytes()


class NearDedup:
    """MinHash LSH: a document is a near duplicate if it shares an LSH band with an earlier kept one
    (estimated Jaccard similarity of 5-gram sets above about `threshold`)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM) -> None:
        from datasketch import MinHashLSH

        self.num_perm = num_perm
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._n = 0

    def is_duplicate(self, sig: bytes) -> bool:
        from datasketch import LeanMinHash

        m = LeanMinHash(seed=SEED, hashvalues=np.frombuffer(sig, dtype=np.uint32), scheme=SCHEME)
        if self._lsh.query(m):
            return True
        self._lsh.insert(self._n, m, check_duplication=False)
        self._n += 1
        return False


def heldout_bucket(key: bytes) -> float:
    """A document's position in [0, 1) for the held-out split: from its content hash, so the split does
    not depend on file order, worker count or interruptions."""
    return int.from_bytes(hashlib.blake2b(b"heldout:" + key, digest_size=8).digest(), "big") / 2**64
