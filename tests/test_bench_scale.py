"""bench/scale.py's summary: the memory growth fit and the N=2 over N=1 speed-up when a size is measured repeatedly."""
from __future__ import annotations

import importlib.util

from conftest import ROOT


def _scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(size, mb, n, seconds, pss):
    return {"stage": "prepare", "size": size, "mb": mb, "num_proc": n, "seconds": seconds,
            "mb_per_s": round(mb / seconds, 4), "peak_tree_pss_mib": pss}


def test_repeated_sizes_pair_in_order_and_quote_the_median_rates():
    rows = [_row("250M", 268, 1, 60.0, 40), _row("250M", 268, 2, 30.0, 58),
            _row("250M", 268, 1, 66.0, 41), _row("250M", 268, 2, 40.0, 60),
            _row("250M", 268, 1, 54.0, 40), _row("250M", 268, 2, 32.0, 59),
            _row("1G", 1074, 1, 240.0, 41), _row("1G", 1074, 2, 125.0, 61)]
    got = _scale().summarise(rows)
    sp = got["speedup_2_over_1"]
    assert sp["prepare/250M"]["runs"] == [2.0, 1.65, 1.69]
    # median rates: 268/60 for N=1 and 268/32 for N=2
    assert abs(sp["prepare/250M"]["median_rates"] - 60.0 / 32.0) <= 0.006
    assert sp["prepare/1G"] == round(240.0 / 125.0, 2)
    fit = got["memory_fit"]["prepare/n2"]
    assert fit["mib_per_gb"] > 0 and fit["ratio_largest_to_smallest"] == round(61 / 58, 3)
    assert any("median of 3 runs" in line for line in got["lines"])
