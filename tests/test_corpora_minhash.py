"""corpora.minhash: batched MinHash-LSH keys are datasketch's MinHash, whatever the batch."""
import random

import numpy as np
import pytest
from datasketch import MinHash

from corpora import minhash

M64 = (1 << 64) - 1


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 400)]
    out = []
    for _ in range(n):
        words = [rng.choice(han) for _ in range(rng.randint(0, 300))]
        for i in range(0, len(words), rng.randint(5, 15)):
            words.insert(i, rng.choice("，。、！？ ,.  "))
        out.append("".join(words))
    return out + ["", "好", "，。！", "一二三四五", "一二三四五六", "ab cd_ef", "数据" * 3000]


def _shingle_hash(s: str) -> int:
    """FNV-1a over the code points, then the 64-bit murmur finaliser, upper half: written out per shingle."""
    h = 0xCBF29CE484222325
    for c in s:
        h = ((h ^ ord(c)) * 0x100000001B3) & M64
    for m in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h = ((h ^ (h >> 33)) * m) & M64
    return (h ^ (h >> 33)) >> 32


def test_shingle_hashes_are_the_per_shingle_hashes():
    texts = _texts(1, 40)
    hv, counts = minhash.shingle_hashes(texts)
    assert len(hv) == counts.sum()
    at = 0
    for t, c in zip(texts, counts):
        sh = minhash.shingles(t)
        assert c == len(sh)
        assert [int(x) for x in hv[at:at + c]] == [_shingle_hash(s) for s in sh]
        at += c


@pytest.mark.parametrize("chunk", [minhash.CHUNK, 7])  # 7: texts cut by block boundaries everywhere
def test_signatures_are_datasketch_minhash(monkeypatch, chunk):
    monkeypatch.setattr(minhash, "CHUNK", chunk)
    texts = _texts(2, 30)
    sigs = minhash.signatures(texts)
    hv, counts = minhash.shingle_hashes(texts)
    starts = np.r_[0, np.cumsum(counts)]
    for i, t in enumerate(texts):
        m = MinHash(num_perm=minhash.NUM_PERM, seed=minhash.SEED, scheme=minhash.SCHEME, hashfunc=int)
        m.update_batch(hv[starts[i]:starts[i + 1]].tolist())
        assert sigs[i].tolist() == np.asarray(m.hashvalues).tolist(), (i, t[:20])


def test_signature_does_not_depend_on_the_batch():
    texts = _texts(3, 25)
    together = minhash.signatures(texts)
    alone = np.stack([minhash.signatures([t])[0] for t in texts])
    assert (together == alone).all()
    assert minhash.signatures([]).shape == (0, minhash.NUM_PERM)


def test_band_keys_match_near_copies_only():
    base = [t for t in _texts(5, 30) if len(minhash.strip(t)) > 150][:6]
    assert len(base) >= 4
    repunct = [t.replace("，", ",").replace("。", "") for t in base]
    edited = [t[:40] + "喵" + t[41:] for t in base]
    other = _texts(6, 6)[:6]
    keys = minhash.band_keys(minhash.signatures(base + repunct + edited + other), 0.7)
    b, r = minhash.bands(0.7)
    assert keys.shape == (len(base) * 3 + 6, b, 2) and b * r <= minhash.NUM_PERM
    n = len(base)

    def shared(i, j):
        return int((keys[i] == keys[j]).all(axis=1).sum())

    for i in range(n):
        assert shared(i, n + i) == b             # re-punctuated: the same shingles, every band
        assert shared(i, 2 * n + i) >= 1         # one character changed in 150+: Jaccard > 0.9
        assert all(shared(i, 3 * n + k) == 0 for k in range(6))
    # a band's key carries its number: equal values in two different bands give different keys
    sig = np.zeros((1, minhash.NUM_PERM), dtype=np.uint32)
    k = minhash.band_keys(sig, 0.7)[0]
    assert len({tuple(x) for x in k.tolist()}) == b
