"""bench/gpu/: the 7B/13B shapes it measures (meta device), and its GPU script run end to end on the CPU (--cpu-smoke)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "shapes.py"), "--json", str(out)],
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


@pytest.mark.reference
@pytest.mark.slow
def test_gpu_script_cpu_smoke(tmp_path, data_dir):
    """bench/gpu/run.sh prepare + device --cpu-smoke: the GPU script end to end on the CPU with the tiny recipe, so
    its code (install, the real entry points, OOM/time handling, the table) cannot rot between GPU runs."""
    vocab = tmp_path / "vocab"
    r = subprocess.run([sys.executable, "-m", "vocab", "merge", "--base", str(data_dir / "tokenizers" / "llama_tokenizer.model"),
                        "--add", str(data_dir / "tokenizers" / "chinese_sp.model"), "--out", str(vocab), "--reference"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    alpaca = tmp_path / "alpaca.json"  # 48 records: the smoke run trains a few steps, it needs no more
    alpaca.write_text(json.dumps(json.loads((data_dir / "instructions" / "alpaca_zh_llamafactory_demo_1k.json")
                                            .read_text(encoding="utf-8"))[:48], ensure_ascii=False), encoding="utf-8")
    gpu_dir = tmp_path / "gpu"
    env = {**os.environ, "ZHLLAMA_GPU_DIR": str(gpu_dir), "PYTHON": sys.executable}
    corpus = sorted((data_dir / "zh_corpus" / "train").glob("*"))[0]
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "run.sh"), "prepare", "--no-wheels", "--corpus-chars", "40000",
                        "--base", str(data_dir / "tokenizers" / "llama_tokenizer.model"), "--vocab", str(vocab),
                        "--alpaca", str(alpaca),
                        "--corpus", str(corpus)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "bash bench/gpu/run.sh device" in r.stdout and "timeout_s: 570" in r.stdout
    manifest = json.loads((gpu_dir / "manifest.json").read_text())
    assert manifest["total_mib"] < manifest["limit_mib"]

    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "run.sh"), "device", "--cpu-smoke", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    res = json.loads((out / "gpu_results.json").read_text())
    assert res["env"]["vocab_size"] == 49953 and res["env"]["recipe"] == "tiny"
    assert [c["kernel"] for c in res["packed_check"]] == ["sdpa_loop"] and res["packed_check"][0]["ok"]
    runs = {(x["stage"], x["micro_batch"]): x for x in res["runs"]}
    expected = [("init", None), ("resize", None)] + [(s, m) for m in (1, 2) for s in (
        "pretrain phase2", "sft train", "plain HF Trainer + PEFT (sft)")] + [("sft train (unchunked loss)", 2)]
    assert sorted(runs, key=str) == sorted(expected, key=str)
    assert all(x["status"] == "ok" for x in runs.values())
    for (stage, m), x in runs.items():
        if m is not None:
            assert x["tokens_per_s"] > 0 and x["peak_rss_bytes"] > 0 and x["loss"] > 0
    assert runs[("pretrain phase2", 2)]["tokens_per_micro_batch"] == 2 * 128
    assert runs[("sft train", 2)]["packed_kernel"] == "sdpa_loop" and runs[("sft train", 2)]["loss_chunk_tokens"] == 1024
    assert runs[("sft train (unchunked loss)", 2)]["loss_chunk_tokens"] == 0
    # same model, data order and steps: the chunked and unchunked loss give the same training loss
    assert runs[("sft train", 2)]["loss"] == pytest.approx(runs[("sft train (unchunked loss)", 2)]["loss"], rel=1e-3)
    table = (out / "table.md").read_text()
    assert "| pretrain phase2 | 2 | ok |" in table and "zhllama SFT tokens/s / plain HF + PEFT" in table
    assert (out / "logs.tar.gz").is_file()
