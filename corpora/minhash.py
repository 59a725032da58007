"""MinHash-LSH band keys for near-duplicate removal, computed for a batch of documents at a time.

The sketch is datasketch's: `MinHash(num_perm=128, seed=1, scheme="affine32")`, whose value for permutation p is
the minimum over a document's shingle hashes h of `fmix32(h) * a[p] + b[p]` (uint32 arithmetic) with
datasketch's own (a, b), and the bands x rows are those `MinHashLSH` picks for the threshold. Shingles are
character 5-grams of the text without punctuation and whitespace: Chinese has no spaces, so character n-grams
stand in for word shingles, and a copy re-punctuated (，/, 。/. or none) keeps its shingles.

What is ours is the batching. Fed one document at a time, datasketch's objects cost 0.2 ms for a 60-character
line (one xxhash call per shingle, a MinHash object, a dozen small numpy calls): four times the rest of
`corpora prepare`. Here a batch's shingles are hashed by a few numpy passes over its code points (FNV-1a over
the 5 code points, then the 64-bit murmur finaliser) and each document's minimum is one `np.minimum.reduceat`
over a (128 x shingles) block. tests/test_corpora_minhash.py checks the signatures against datasketch's MinHash
fed the same shingle hashes, and the shingle hashes against a per-shingle reference.
"""
from __future__ import annotations

import functools
import re

import numpy as np

NUM_PERM = 128
NGRAM = 5
SEED = 1
# pinned so signatures stay comparable across datasketch releases (its default may change)
SCHEME = "affine32"
# shingles per (num_perm x shingles) uint32 block: 4 MiB, cache-sized; 1 << 15 was no faster and took 36 MiB more
CHUNK = 1 << 13

_NOT_WORD = re.compile(r"[\W_]+")
# pads a text shorter than n to one shingle; \W removed every space, so no real shingle contains one
_PAD = " "
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))
# the two halves of a 128-bit band key: the same chain with different starting values
_KEY_SEEDS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD1B54A32D192ED03))


def strip(text: str) -> str:
    return _NOT_WORD.sub("", text)


def _stripped(text: str, n: int) -> str:
    """The text without punctuation and whitespace, padded to at least n characters (one shingle)."""
    s = strip(text)
    return s if len(s) >= n else s + _PAD * (n - len(s))


def shingles(text: str, n: int | None = None) -> list[str]:
    """The shingles of a text as strings (for exact Jaccard similarities: bench/near_dedup.py, the tests)."""
    n = n or NGRAM
    s = _stripped(text, n)
    return [s[i:i + n] for i in range(len(s) - n + 1)]


def _fmix64(h: np.ndarray) -> np.ndarray:
    s, m1, m2 = _FMIX64
    h = h ^ (h >> s)
    h = h * m1
    h = h ^ (h >> s)
    h = h * m2
    return h ^ (h >> s)


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2 = _FMIX32
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s1)


def shingle_hashes(texts: list[str], n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 hash of every shingle of every text, in order; the number of shingles of each text)."""
    n = n or NGRAM
    padded = [_stripped(t, n) for t in texts]
    counts = np.fromiter((len(s) - n + 1 for s in padded), dtype=np.int64, count=len(padded))
    cp = np.frombuffer("".join(padded).encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.uint64)
    with np.errstate(over="ignore"):
        windows = len(cp) - n + 1
        h = np.full(max(windows, 0), _FNV_OFFSET, dtype=np.uint64)
        for k in range(n):
            h ^= cp[k:k + windows]
            h *= _FNV_PRIME
    # the windows inside one text: text i's start in the code points, then its count of consecutive windows
    starts = np.cumsum(counts + n - 1) - (counts + n - 1)
    first = np.cumsum(counts) - counts
    pos = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - first, counts)
    return (_fmix64(h[pos]) >> np.uint64(32)).astype(np.uint32), counts


@functools.lru_cache(maxsize=None)
def permutations(num_perm: int = NUM_PERM) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def signatures(texts: list[str], num_perm: int = NUM_PERM) -> np.ndarray:
    """(len(texts), num_perm) uint32: datasketch's MinHash of each text's shingle hashes."""
    hv, counts = shingle_hashes(texts)
    a, b = permutations(num_perm)
    out = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    if not len(hv):
        return out
    doc = np.repeat(np.arange(len(texts)), counts)
    hv = _fmix32(hv)
    for lo in range(0, len(hv), CHUNK):
        d = doc[lo:lo + CHUNK]
        # (num_perm, shingles): the minimum runs along rows in memory order, 10x faster than down columns
        ph = a[:, None] * hv[None, lo:lo + CHUNK] + b[:, None]
        seg = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        ids = d[seg]  # distinct within a block; a text cut by a block boundary takes the minimum of both parts
        out[ids] = np.minimum(out[ids], np.minimum.reduceat(ph, seg, axis=1).T)
    return out


@functools.lru_cache(maxsize=None)
def bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(b, r): the bands and rows per band datasketch's MinHashLSH chooses for this threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(sigs: np.ndarray, threshold: float) -> np.ndarray:
    """(texts, b, 2) uint64: a 128-bit key per LSH band. Each half chains the 64-bit murmur finaliser (a
    bijection) over the band's values from its own start, and the band number is part of the start, so two
    keys are equal only when the band's values are (up to a 2**-128 chance) and bands never match each other."""
    b, r = bands(threshold, sigs.shape[1])
    v = sigs[:, :b * r].reshape(len(sigs), b, r).astype(np.uint64)
    keys = np.empty((len(sigs), b, 2), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for half, seed in enumerate(_KEY_SEEDS):
            h = np.broadcast_to(seed ^ np.arange(b, dtype=np.uint64), (len(sigs), b))
            for j in range(r):
                h = _fmix64(h ^ v[:, :, j])
            keys[:, :, half] = h
    return keys
