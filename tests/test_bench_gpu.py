"""bench/gpu.py's CPU dry run: the 7B/13B shapes and trainable fractions it would measure on a GPU."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {(x["model"], x["stage"]): x for x in json.loads(out.read_text())["rows"]}
    assert rows[("llama-7b", "phase2")]["trainable_percent"] == 6.06
    assert rows[("llama-7b", "sft")]["trainable_percent"] == 6.22
    assert rows[("llama-13b", "phase2")]["trainable_percent"] == 3.97
    assert rows[("llama-13b", "sft")]["trainable_percent"] == 4.10
    assert rows[("llama-7b", "phase2")]["layers"] == 32 and rows[("llama-13b", "sft")]["hidden"] == 5120
    # the 24 GB consumer-GPU story: the phase-2 estimate at micro-batch 1 stays under 22 GiB
    assert 0 < rows[("llama-7b", "phase2")]["plan_phase2_GiB_per_gpu"] <= 22
