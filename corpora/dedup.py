"""Duplicate removal for `corpora prepare` in memory that does not grow with the corpus.

Every document (piece) gets 16-byte keys: for exact dedup the blake2b-128 of its text; for near dedup the
MinHash-LSH band keys, one per band (corpora.minhash: datasketch's MinHash over character 5-grams of the text
without punctuation and whitespace, cut into the b bands x r rows that datasketch's `MinHashLSH` picks). The
pass-1 workers write the keys of each work unit to disk as sorted runs (`KeyWriter`: columns (key_hi, key_lo,
piece index), at most about `KEY_RUN` rows per file, so a worker holds at most that many whatever the size of its
input). The dedup pass then cuts the 128-bit key space into ranges of about `GROUP_ROWS` rows in all
(`group_bounds`) and handles one range at a time (`find_duplicates`: the rows of that range from every run,
found by binary search in the memory-mapped files, sorted by key then global position). A piece is a duplicate
when an earlier piece in input order has the same key, so the first occurrence wins and the result does not
depend on the number of processes.
Memory: one key range (bounded) plus one bit per piece for the result.

Semantics of near dedup: a piece is a near duplicate when it shares an LSH band with ANY earlier piece
(Jaccard similarity of 5-gram sets above about the threshold). datasketch's sequential `MinHashLSH`
compares with earlier KEPT pieces only; the two differ only for chains (A kept, B near A dropped, C near
B but not near A: sequential LSH keeps C, this drops it), which is the price of not holding an index of
every kept document in memory.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from pathlib import Path

import numpy as np

KEY_RUN = 1 << 18      # rows per sorted run file written by a pass-1 worker (6 MiB, about 4x that while sorting)
GROUP_ROWS = 1 << 17   # rows per key range in the dedup pass (3 MiB, about 3x that while sorting): small, so the
                       # range size (between half and all of this) moves the peak by little (bench/scale.py)


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def heldout_value(key: bytes) -> int:
    """A document's 64-bit hash for the held-out split: from its content, so the split does not depend on
    file order, worker count or interruptions."""
    return int.from_bytes(hashlib.blake2b(b"heldout:" + key, digest_size=8).digest(), "big")


def heldout_bucket(key: bytes) -> float:
    """heldout_value as a position in [0, 1): held out when below the held-out fraction."""
    return heldout_value(key) / 2**64


def heldout_cut(fraction: float) -> int:
    """The integer form of `heldout_bucket(key) < fraction`: held out when heldout_value(key) < this."""
    lo, hi = 0, 2**64  # the smallest value v with v / 2**64 >= fraction (float rounding included)
    while lo < hi:
        mid = (lo + hi) // 2
        if mid / 2**64 < fraction:
            lo = mid + 1
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------------ keys on disk

def save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    tmp.replace(path)


class KeyWriter:
    """Keys of one work unit -> sorted run files `<stem>.<r>.npy`: uint64 (3, n), rows key_hi, key_lo, piece index."""

    def __init__(self, stem: Path):
        self.stem = stem
        self.runs: list[str] = []
        self.rows = 0
        self._keys = bytearray()
        self._idx = array("Q")

    def add(self, keys: bytes, index: int) -> None:
        """keys: one or more 16-byte keys (big-endian key_hi, key_lo) of the piece at index."""
        self._keys += keys
        self._idx.extend([index] * (len(keys) >> 4))
        if len(self._idx) >= KEY_RUN:
            self._flush()

    def _flush(self) -> None:
        if not self._idx:
            return
        k = np.frombuffer(bytes(self._keys), dtype=">u8").reshape(-1, 2).astype(np.uint64)
        idx = np.frombuffer(self._idx, dtype=np.uint64)
        order = np.lexsort((idx, k[:, 1], k[:, 0]))
        # column-major (3, n): the key_hi row is contiguous, so a binary search reads log(n) pages, copies nothing
        rows = np.stack([k[order, 0], k[order, 1], idx[order]])
        path = self.stem.with_name(f"{self.stem.name}.{len(self.runs)}.npy")
        save_atomic(path, rows)
        self.runs.append(path.name)
        self.rows += rows.shape[1]
        self._keys = bytearray()
        self._idx = array("Q")

    def close(self) -> list[str]:
        self._flush()
        return self.runs


def group_bounds(total_rows: int) -> list[tuple[int, int | None]]:
    """Key ranges [lo, hi) over the first 64 bits with about GROUP_ROWS rows each (keys are uniform hashes)."""
    g = max(1, -(-total_rows // GROUP_ROWS))
    cuts = [(i << 64) // g for i in range(g)]
    return [(lo, cuts[i + 1] if i + 1 < g else None) for i, lo in enumerate(cuts)]


def find_duplicates(runs: list[tuple[str, int]], lo: int, hi: int | None) -> np.ndarray:
    """Global positions of the pieces that have a key in [lo, hi) that an earlier piece also has.

    runs: (run file, global position of its unit's first piece)."""
    k0, k1, pos = [], [], []
    for path, base in runs:
        a = np.load(path, mmap_mode="r")
        col = a[0]
        i = int(np.searchsorted(col, np.uint64(lo), "left"))
        j = col.shape[0] if hi is None else int(np.searchsorted(col, np.uint64(hi), "left"))
        if j > i:
            k0.append(np.array(col[i:j]))
            k1.append(np.array(a[1, i:j]))
            pos.append(a[2, i:j] + np.uint64(base))
        del a, col
    if not pos:
        return np.zeros(0, dtype=np.uint64)
    k0, k1, pos = np.concatenate(k0), np.concatenate(k1), np.concatenate(pos)
    order = np.lexsort((pos, k1, k0))
    k0, k1, pos = k0[order], k1[order], pos[order]
    same = (k0[1:] == k0[:-1]) & (k1[1:] == k1[:-1])
    return pos[1:][same]


def set_bits(bits: np.ndarray, positions: np.ndarray) -> None:
    if len(positions):
        np.bitwise_or.at(bits, (positions >> np.uint64(3)).astype(np.int64),
                         (np.uint8(1) << (positions & np.uint64(7)).astype(np.uint8)))


def get_bit(bits: np.ndarray, pos: int) -> bool:
    return bool((int(bits[pos >> 3]) >> (pos & 7)) & 1)
