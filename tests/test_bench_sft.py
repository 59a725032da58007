"""bench/sft_throughput.py end to end on the shared data: zhllama and plain HF + PEFT on the tiny shape.

The peers in their own venvs (TRL, LLaMA-Factory) need PyPI and minutes to install, so they are left to
`make bench`; this checks the harness itself: both tools run, count the same non-padding tokens of the same
examples, and the common held-out evaluation scores their adapters alike.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DATA, ROOT


@pytest.mark.reference
def test_sft_benchmark_harness(tmp_path):
    out = tmp_path / "sft.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sft_throughput.py"), "--models", "tiny", "--tools",
                        "zhllama", "hf", "--steps", "3", "--eval-records", "8", "--cache", str(tmp_path / "cache"),
                        "--tokenizer", str(DATA / "tokenizers" / "llama_tokenizer.model"), "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {x["tool"]: x for x in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"zhllama", "hf"}
    for x in rows.values():
        assert x["steps"] == 3 and x["tokens"] > 0 and x["tokens_per_s"] > 0 and x["peak_rss_mib"] > 0
        assert x["heldout_loss"] < x["heldout_loss_before"]
    # same 12 examples, same prompt text: token counts differ only by tokenization at the prompt boundary
    assert abs(rows["zhllama"]["tokens"] - rows["hf"]["tokens"]) <= 12
    assert rows["zhllama"]["heldout_loss"] == pytest.approx(rows["hf"]["heldout_loss"], abs=0.05)
    assert "| tiny |" in r.stdout
