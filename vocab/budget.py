"""The span budget: a counter cut to its most frequent entries, the same whatever order they were counted in.

Shared by the counters of vocab.extend (collect_spans), vocab.spans (count_spans) and vocab.bytelevel
(count_words); it lives here so that none of them imports another for it.

Public API:
    prune(counter, max_spans) -> Counter
"""
from __future__ import annotations

import zlib
from collections import Counter


def prune(counter: Counter, max_spans: int) -> Counter:
    """The max_spans most frequent spans, rarest dropped first (lossy counting). Of the count class at the cut, the
    spans with the smallest CRC-32 are kept: neither the order spans were seen in nor their code points bias the
    choice, and the result is the same for any order. A kept span can be undercounted by at most the sum of the
    cut counts of the earlier prunes that dropped it."""
    if not max_spans or len(counter) <= max_spans:
        return counter
    classes = Counter(counter.values())
    above, cut = 0, 0
    for v in sorted(classes, reverse=True):
        if above + classes[v] > max_spans:
            cut = v
            break
        above += classes[v]
    boundary = sorted((s for s, n in counter.items() if n == cut), key=lambda s: (zlib.crc32(s.encode()), s))
    keep = set(boundary[:max_spans - above])
    return Counter({s: n for s, n in counter.items() if n > cut or s in keep})
