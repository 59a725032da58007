"""Core tests of `corpora prepare` and `corpora instructions`: hermetic text from conftest, no shared data."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_chinese_lines, make_english_lines
from corpora import clean, dedup
from corpora.instruct import convert_files
from corpora.prepare import PrepareConfig, prepare

REASONS_DROPPED = ("empty", "malformed_json", "missing_field", "too_short", "low_cjk_ratio", "exact_duplicate",
                   "near_duplicate")


def _unique(lines):
    return list(dict.fromkeys(lines))


def read_split(out: Path, split: str) -> list[str]:
    texts = []
    for shard in sorted((out / split).glob("shard-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every output file except the resumable work folder and manifest.json (it records when and by which command)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".work" not in p.parts and p.name != "manifest.json"}


def build_faulty_corpus(root: Path) -> dict:
    """A corpus with every fault the prepare command must handle, and what it should keep."""
    root.mkdir(parents=True, exist_ok=True)
    good = _unique(make_chinese_lines(300, 11))
    more = _unique(make_chinese_lines(200, 12))
    gb = _unique(make_chinese_lines(150, 13))
    bad = _unique(make_chinese_lines(100, 14))
    pool = set(good) | set(more) | set(gb) | set(bad)
    assert len(pool) == len(good) + len(more) + len(gb) + len(bad)
    (root / "good.txt").write_text("\n".join(good) + "\n", encoding="utf-8")
    # 30% of this file's documents repeat documents of good.txt (or of itself)
    dups = good[:60] + more[:30]
    (root / "dups.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in more + dups),
                                     encoding="utf-8")
    (root / "gb.txt").write_bytes(("\r\n".join(gb) + "\r\n").encode("gb18030"))
    raw = b""
    n_bad_bytes = n_nul = 0
    for i, t in enumerate(bad):
        b = t.encode("utf-8")
        if i % 3 == 0:
            cut = len(t[:5].encode("utf-8"))
            b = b[:cut] + b"\xff\xfe" + b[cut:]  # invalid UTF-8 between characters
            n_bad_bytes += 1  # Python replaces the run \xff\xfe by one U+FFFD per byte: counted below
        if i % 4 == 0:
            b = b"\x00" + b + b"\x00\x00"
            n_nul += 3
        raw += b + b"\n"
    (root / "bad.txt").write_bytes(raw)
    (root / "empty.txt").write_bytes(b"")
    long_doc = "".join(make_chinese_lines(4000, 15))  # one line of ~150k characters
    (root / "long.txt").write_text(long_doc + "\n", encoding="utf-8")
    english = _unique(make_english_lines(80, 16))
    (root / "english.txt").write_text("\n".join(english) + "\n", encoding="utf-8")
    return {"unique": pool, "long": long_doc, "dups": len(dups), "dups_within": 30, "english": len(english),
            "bad_lines": sum(1 for i in range(len(bad)) if i % 3 == 0), "nul": n_nul, "gb": len(gb)}


PREPARE_ARGS = ["--min-chars", "5", "--heldout-fraction", "0.1", "--max-chars", "20000", "--shard-docs", "40",
                "--no-progress"]


def _cli(inp: Path, out: Path, *extra):
    return [sys.executable, "-m", "corpora", "prepare", "--input", str(inp), "--out", str(out), *PREPARE_ARGS, *extra]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    root = tmp_path_factory.mktemp("faulty")
    expect = build_faulty_corpus(root / "in")
    out = root / "out"
    r = subprocess.run(_cli(root / "in", out), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return root, expect, out, r.stderr


def test_prepare_keeps_every_good_document_once_and_counts_each_fault(faulty):
    root, expect, out, _ = faulty
    train, held = read_split(out, "train"), read_split(out, "heldout")
    texts = train + held
    assert len(texts) == len(set(texts))
    assert not set(train) & set(held)
    long_pieces = [t for t in texts if t not in expect["unique"]]
    # the long line comes back whole, in order, in one split
    assert "".join(long_pieces) == expect["long"] and len(long_pieces) > 1
    assert all(len(p) <= 20000 for p in long_pieces)
    assert set(texts) - set(long_pieces) == expect["unique"]

    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    files = {Path(k).name: v for k, v in stats["files"].items()}
    t = stats["total"]
    assert t["dropped"]["exact_duplicate"]["docs"] == expect["dups"]
    # the first occurrence in input order (sorted paths: dups.jsonl before good.txt) is the one kept
    assert files["dups.jsonl"]["dropped"]["exact_duplicate"]["docs"] == expect["dups_within"]
    assert files["good.txt"]["dropped"]["exact_duplicate"]["docs"] == expect["dups"] - expect["dups_within"]
    assert files["english.txt"]["dropped"]["low_cjk_ratio"]["docs"] == expect["english"]
    assert files["english.txt"]["docs_kept"] == 0
    assert files["gb.txt"]["encoding"] == "gb18030" and files["gb.txt"]["docs_kept"] == expect["gb"]
    assert files["gb.txt"]["normalisation"]["invalid_bytes"] == 0
    assert files["bad.txt"]["encoding"] == "utf-8"
    assert files["bad.txt"]["normalisation"]["invalid_bytes"] == 2 * expect["bad_lines"]
    assert files["bad.txt"]["normalisation"]["control_chars"] == expect["nul"]
    assert files["empty.txt"]["empty_file"] and files["empty.txt"]["docs_in"] == 0
    assert files["long.txt"]["split"]["docs"] == 1 and files["long.txt"]["split"]["pieces"] == len(long_pieces)
    assert t["train"]["docs"] == len(train) and t["heldout"]["docs"] == len(held)
    assert t["chars_kept"] == sum(map(len, texts))
    # the accounting stats.json promises, per file and in total
    for st in list(stats["files"].values()) + [t]:
        dropped_docs = sum(v["docs"] for v in st["dropped"].values())
        dropped_chars = sum(v["chars"] for v in st["dropped"].values())
        assert st["docs_in"] - st["split"]["docs"] + st["split"]["pieces"] == st["docs_kept"] + dropped_docs
        assert st["chars_in"] - st["normalisation"]["chars_removed"] == st["chars_kept"] + dropped_chars


def test_prepare_rerun_after_kill_9_is_byte_identical(faulty):
    """kill -9 of the whole job (launcher and workers) once some tasks of a stage have their datatrove completion
    marker: the same command again skips those tasks, redoes the others, and writes the same bytes."""
    root, _, ref_out, _ = faulty
    ref = tree_bytes(ref_out)
    done = lambda o, stage: list((o / ".work" / "logs").glob(f"{stage}-t*/completions/*"))  # noqa: E731
    for stage, marker in (("clean", lambda o: done(o, "clean")),
                          ("shards", lambda o: done(o, "shards"))):
        out = root / f"killed-{stage}"
        p = subprocess.Popen(_cli(root / "in", out, "--tasks", "6", "--workers", "2"), cwd=ROOT,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and p.poll() is None and not (out.exists() and marker(out)):
            time.sleep(0.002)
        os.killpg(p.pid, signal.SIGKILL)  # the main process and its workers, like kill -9 of the job
        p.wait()
        assert not (out / "stats.json").exists(), f"the run finished before the kill in {stage}"
        finished = len(done(out, stage))
        assert 0 < finished < 6 or stage == "shards", finished
        r = subprocess.run(_cli(root / "in", out, "--tasks", "6", "--workers", "2"), cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert tree_bytes(out) == ref, stage
        # success removes the work folder; a third run redoes nothing and leaves the same bytes
        assert not (out / ".work").exists()
        r = subprocess.run(_cli(root / "in", out), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert "up to date" in r.stderr and tree_bytes(out) == ref


def test_same_bytes_for_1_2_and_4_tasks(faulty, tmp_path):
    """The prepared output of a corpus of several files does not depend on how many tasks the work is cut into
    (nor on how many run at once): 1, 2 and 4 tasks write byte-identical shards and stats."""
    from zhllama.executors import ExecutorConfig

    root, _, ref_out, _ = faulty
    cfg = PrepareConfig(min_chars=5, heldout_fraction=0.1, max_chars=20000, shard_docs=40, dedup="near")
    trees = {}
    for tasks, workers in ((1, 1), (2, 2), (4, 2)):
        out = tmp_path / f"t{tasks}"
        prepare([root / "in"], out, cfg, progress=False, log=lambda m: None,
                executor=ExecutorConfig(tasks=tasks, workers=workers))
        trees[tasks] = tree_bytes(out)
    assert trees[1] == trees[2] == trees[4]
    assert len([n for n in trees[1] if n.startswith("train/")]) > 5
    # and the near-dedup run keeps what the exact-only reference run keeps, minus its near copies only
    assert set(read_split(tmp_path / "t1", "train")) <= set(read_split(ref_out, "train"))


def test_prepare_output_streams_with_datasets(faulty):
    import datasets

    _, _, out, _ = faulty
    ds = datasets.load_dataset("json", data_files={"train": str(out / "train" / "*.jsonl.gz"),
                                                   "heldout": str(out / "heldout" / "*.jsonl.gz")}, streaming=True)
    assert [r["text"] for r in ds["heldout"]] == read_split(out, "heldout")


@pytest.mark.integration("ray")
def test_ray_executor_writes_the_same_bytes(faulty, tmp_path):
    """--executor ray on a local Ray instance (ray.init(num_cpus=2)): the same output as the local executor."""
    import ray

    from zhllama.executors import ExecutorConfig

    root, _, ref_out, _ = faulty
    cfg = PrepareConfig(min_chars=5, heldout_fraction=0.1, max_chars=20000, shard_docs=40)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        prepare([root / "in"], tmp_path / "ray", cfg, progress=False, log=lambda m: None,
                executor=ExecutorConfig(executor="ray", tasks=3))
    finally:
        ray.shutdown()
    assert tree_bytes(tmp_path / "ray") == tree_bytes(ref_out)


FAKE_SBATCH = """#!/bin/sh
# records each submission (arguments, then the script) and answers like sbatch
n=$(ls "$JOBS" | wc -l)
{ echo "$@"; cat "$(eval echo \\${$#})"; } > "$JOBS/$n.job"
echo "Submitted batch job $((100 + n))"
"""


def test_slurm_executor_submits_a_dependent_chain_that_runs_to_the_same_bytes(faulty, tmp_path):
    """--executor slurm with a stand-in sbatch on PATH: one job array per stage, each after the previous one, on the
    partition and time limit asked for; running the submitted tasks the way Slurm would (SLURM_ARRAY_TASK_ID) and
    then the same command again gives the local executor's bytes."""
    import re

    root, _, ref_out, _ = faulty
    jobs, bin_dir, out = tmp_path / "jobs", tmp_path / "bin", tmp_path / "out"
    jobs.mkdir()
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho \"$3\"\n")  # scontrol show hostnames NODELIST
    for tool in ("sbatch", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "JOBS": str(jobs), "PYTHONPATH": str(ROOT)}
    cmd = _cli(root / "in", out, "--executor", "slurm", "--slurm-partition", "cpu", "--slurm-time", "01:30:00",
               "--tasks", "3")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "submitted 4 dependent Slurm job arrays" in r.stderr and not (out / "stats.json").exists()
    subs = [(jobs / f"{i}.job").read_text() for i in range(len(list(jobs.iterdir())))]
    arrays = [s for s in subs if "launch_pickled_pipeline" in s]
    assert len(arrays) == 4
    ids = [100 + subs.index(a) for a in arrays]
    for k, a in enumerate(arrays):
        assert "#SBATCH --partition=cpu" in a and "#SBATCH --time=01:30:00" in a
        assert f"#SBATCH --array=0-{0 if k == 3 else 2}" in a
        if k:
            assert f"--dependency=afterok:{ids[k - 1]}" in a.splitlines()[0]
    # the same command while the chain is queued: refused, nothing submitted twice
    names = sorted({re.search(r"#SBATCH --job-name=(\S+)", a).group(1) for a in arrays})
    (bin_dir / "squeue").write_text("#!/bin/sh\n" + "".join(f"echo {n}\n" for n in names))
    (bin_dir / "squeue").chmod(0o755)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "still queued or running" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert len(list(jobs.iterdir())) == len(subs)
    (bin_dir / "squeue").write_text("#!/bin/sh\n")  # the queue is empty again
    launcher = Path(sys.executable).parent / "launch_pickled_pipeline"
    for a in arrays:  # what Slurm would do, in dependency order
        pik = re.search(r"launch_pickled_pipeline (\S+)", a).group(1)
        n = int(re.search(r"#SBATCH --array=0-(\d+)", a).group(1)) + 1
        for t in range(n):
            subprocess.run([str(launcher), pik], env={**env, "SLURM_ARRAY_TASK_ID": str(t), "RUN_OFFSET": "0", "SLURM_NODELIST": "localhost"},
                           cwd=ROOT, check=True, capture_output=True, timeout=120)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list(jobs.iterdir())) == len(subs)  # nothing submitted again
    assert tree_bytes(out) == tree_bytes(ref_out)


def test_same_shards_for_any_num_proc_work_units_and_key_ranges(tmp_path, monkeypatch):
    """A big .txt cut into many line-aligned units, keys in many runs and ranges: N=1 and N=2 write the same
    bytes, and the documents and per-file stats are those of the one-unit, one-range run."""
    from corpora import pipeline
    from zhllama.executors import ExecutorConfig

    base = _unique(make_chinese_lines(800, 61))
    docs = ["".join(base[i:i + 4]) for i in range(0, 800, 4)]
    near = [d[:-2] + "嗯。" for d in docs[:20]]
    body = docs + ["太短"] + docs[:30] + near + [docs[5]]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.txt").write_text("\n".join(body) + "\n", encoding="utf-8")
    (tmp_path / "in" / "z.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                                     for t in docs[100:110] + base[:40]), encoding="utf-8")
    opts = dict(dedup="near", heldout_fraction=0.2, shard_docs=70, min_chars=5)
    ref = prepare([tmp_path / "in"], tmp_path / "ref", PrepareConfig(**opts, num_proc=1), progress=False, log=lambda m: None)
    monkeypatch.setattr(pipeline, "UNIT_BYTES", 4096)
    monkeypatch.setattr(dedup, "KEY_RUN", 100)
    monkeypatch.setattr(dedup, "GROUP_ROWS", 300)
    got = {n: prepare([tmp_path / "in"], tmp_path / f"n{n}", PrepareConfig(**opts), progress=False,
                      log=lambda m: None, executor=ExecutorConfig(tasks=n, workers=min(n, 2))) for n in (1, 2, 5)}
    assert tree_bytes(tmp_path / "n1") == tree_bytes(tmp_path / "n2") == tree_bytes(tmp_path / "n5")
    assert len({name.split("-")[1] for name in got[1]["shards"]["train"]}) > 10  # shards of many units
    for split in ("train", "heldout"):
        assert read_split(tmp_path / "n1", split) == read_split(tmp_path / "ref", split)
    assert got[1]["files"] == ref["files"] and got[1]["total"] == ref["total"]
    big = ref["files"][str(tmp_path / "in" / "big.txt")]
    assert big["dropped"]["exact_duplicate"]["docs"] == 31 and big["dropped"]["near_duplicate"]["docs"] == 20
    assert big["examples"]["too_short"] == [f"line {len(docs) + 1}"]
    assert ref["files"][str(tmp_path / "in" / "z.jsonl")]["dropped"]["exact_duplicate"]["docs"] == 10


def test_changed_options_restart_pass_two(tmp_path):
    inp = tmp_path / "a.txt"
    lines = _unique(make_chinese_lines(120, 21))
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare([inp], tmp_path / "o", PrepareConfig(shard_docs=50, heldout_fraction=0.0, num_proc=1), progress=False, log=lambda m: None)
    assert len(read_split(tmp_path / "o", "train")) == len(lines)
    prepare([inp], tmp_path / "o", PrepareConfig(shard_docs=1000, heldout_fraction=0.5, num_proc=1), progress=False, log=lambda m: None)
    train, held = read_split(tmp_path / "o", "train"), read_split(tmp_path / "o", "heldout")
    assert sorted(train + held) == sorted(lines) and len(list((tmp_path / "o" / "train").iterdir())) == 1
    # the held-out choice depends on the document only: the same documents in another order split the same
    inp.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    prepare([inp], tmp_path / "r", PrepareConfig(heldout_fraction=0.5, num_proc=1), progress=False, log=lambda m: None)
    assert set(read_split(tmp_path / "r", "heldout")) == set(held) and 0 < len(held) < len(lines)


def test_formats_jsonl_json_parquet_gzip_and_bad_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b, c, d = (_unique(make_chinese_lines(30, s)) for s in (31, 32, 33, 34))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in a:
            f.write(json.dumps({"content": t}, ensure_ascii=False) + "\n")
        f.write('{"content": "未闭合\n')          # malformed
        f.write('{"other": "没有这个字段"}\n')    # missing field
    (tmp_path / "b.json").write_text(json.dumps([{"content": t} for t in b], ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.table({"content": c}), tmp_path / "c.parquet")
    with gzip.open(tmp_path / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(d) + "\n")
    stats = prepare([tmp_path], tmp_path / "out", PrepareConfig(field="content", heldout_fraction=0.0, num_proc=2),
                    progress=False, log=lambda m: None)
    assert sorted(read_split(tmp_path / "out", "train")) == sorted(set(a + b + c + d))
    files = {Path(k).name: v for k, v in stats["files"].items()}
    assert files["a.jsonl.gz"]["dropped"]["malformed_json"]["docs"] == 1
    assert files["a.jsonl.gz"]["dropped"]["missing_field"]["docs"] == 1
    assert files["a.jsonl.gz"]["examples"]["malformed_json"] == [f"line {len(a) + 1}"]


def test_malformed_json_array_is_one_clear_error(tmp_path):
    (tmp_path / "x.json").write_text('[{"text": "你好"},\n{"text": }]', encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "corpora", "prepare", "--input", str(tmp_path / "x.json"), "--out",
                        str(tmp_path / "o"), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "x.json: line 2" in r.stderr and "Traceback" not in r.stderr


def test_normalize_keeps_chinese_punctuation_and_fixes_the_rest():
    zh = "他说：“我们一定要把这件事情做好。”大家纷纷点头（表示同意）……好吗？好！"
    assert clean.normalize(zh) == zh
    assert clean.normalize(zh, fullwidth_ascii=True) == zh
    f = clean.Fixes()
    assert clean.normalize("\ufeff第一行\r\n第二\x00行\r第三行\u2028\ud800第四\ufffd行 ", fixes=f) == "第一行\n第二行\n第三行\n第四行"
    assert (f.line_endings, f.control_chars, f.invalid_bytes) == (3, 3, 1)
    assert clean.normalize("１９９８年１．５倍，ＡＢＣ＋ｘｙｚ！", fullwidth_ascii=True) == "1998年1.5倍，ABC+xyz！"
    assert clean.normalize("１９９８年") == "１９９８年"


def test_detect_encoding_and_cjk_ratio():
    text = "\n".join(make_chinese_lines(200, 41)).encode("utf-8")
    assert clean.detect_encoding(text).encoding == "utf-8"
    assert clean.detect_encoding(text.decode().encode("gb18030")).encoding == "gb18030"
    trad = "長江是中國第一大河，全長約六千三百公里。我們會在這個時間來學習。" * 30
    assert clean.detect_encoding(trad.encode("big5")).encoding == "big5"
    damaged = text[:3000] + b"\xff" + text[3000:]
    g = clean.detect_encoding(damaged)
    assert g.encoding == "utf-8" and g.how == "scored"
    assert clean.cjk_ratio("中文 abc") == pytest.approx(2 / 5)
    assert clean.drop_reason("English only here", 5, 0.3) == "low_cjk_ratio"


def test_split_long_joins_back():
    doc = "".join(make_chinese_lines(200, 42)) + "无标点" * 500
    pieces = clean.split_long(doc, 300)
    assert "".join(pieces) == doc and all(0 < len(p) <= 300 for p in pieces)
    assert clean.split_long("短文本。", 300) == ["短文本。"]


def test_near_dedup_drops_near_copies_only(tmp_path):
    base = _unique(make_chinese_lines(60, 51))
    docs = ["".join(base[i:i + 4]) for i in range(0, 60, 4)]  # 15 long-ish distinct documents
    near = [d[:-2] + "嗯。" for d in docs[:5]]                  # the same text with its last 2 characters changed
    # re-punctuated copies (ASCII marks, or none): Chinese puts a mark every few words, so with the marks in the
    # shingles most 5-grams of such a copy differ from the original's
    table = str.maketrans({"，": ", ", "。": ".", "、": ",", "；": ";", "！": "!", "？": "?"})
    repunct = [docs[5].translate(table), docs[6].translate(str.maketrans("", "", "，。、；！？"))]
    (tmp_path / "a.txt").write_text("\n".join(docs + near + repunct) + "\n", encoding="utf-8")
    cfg = PrepareConfig(dedup="near", heldout_fraction=0.0, num_proc=1)
    stats = prepare([tmp_path / "a.txt"], tmp_path / "o", cfg, progress=False, log=lambda m: None)
    assert read_split(tmp_path / "o", "train") == docs
    assert stats["total"]["dropped"]["near_duplicate"]["docs"] == 7
    assert "datasketch" in stats["dedup_library"]
    assert dedup.heldout_bucket(b"x") == dedup.heldout_bucket(b"x")
    # near dedup is the default
    assert PrepareConfig().dedup == "near"


def test_heldout_cut_is_the_integer_form_of_the_fraction():
    for f in (0.0, 0.01, 0.05, 0.5, 0.999):
        c = dedup.heldout_cut(f)
        assert all((v / 2**64 < f) == (v < c) for v in (c - 1, c, c + 1) if 0 <= v < 2**64)
        keys = [dedup.text_key(str(i)) for i in range(2000)]
        assert [dedup.heldout_bucket(k) < f for k in keys] == [dedup.heldout_value(k) < c for k in keys]


# ------------------------------------------------------------------------------------------- instructions

def test_instructions_convert_each_format(tmp_path):
    rows = [
        {"instruction": "翻译", "input": "猫", "output": "cat"},
        {"id": "seed_task_1", "instruction": "写诗", "instances": [{"input": "夏天", "output": "诗一"},
                                                                 {"input": "", "output": "诗二"}]},
        {"question": "天为什么是蓝的？", "std_answer": "瑞利散射。", "class": "open_qa"},
        {"input": "判断情感：很好", "target": "正面", "type": "classify"},
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                           {"from": "human", "value": "一加一？"}, {"from": "gpt", "value": "二。"}]},
    ]
    src = tmp_path / "mixed.json"
    src.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    rep = convert_files([src], tmp_path / "out.json", log=lambda m: None)
    got = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert rep["dropped"] == 0 and len(got) == 6
    assert got[0] == rows[0]
    assert got[1:3] == [{"instruction": "写诗", "input": "夏天", "output": "诗一"},
                        {"instruction": "写诗", "input": "", "output": "诗二"}]
    assert got[3] == {"instruction": "天为什么是蓝的？", "input": "", "output": "瑞利散射。"}
    assert got[4] == {"instruction": "判断情感：很好", "input": "", "output": "正面"}
    # multi-turn conversations stay conversations (sft trains every assistant turn)
    assert got[5] == {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                                   {"role": "user", "content": "一加一？"}, {"role": "assistant", "content": "二。"}]}
    convert_files([src], tmp_path / "out.jsonl", log=lambda m: None)
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == got


def test_instructions_reject_bad_records_with_file_and_index(tmp_path):
    rows = [
        {"instruction": "好", "output": "好的"},
        {"instruction": "", "output": "空指令"},
        {"instruction": "缺输出"},
        {"instruction": "类型错", "output": 3},
        {"conversations": [{"from": "human", "value": "只有提问"}]},
        {"conversations": [{"from": "gpt", "value": "先回答"}, {"from": "human", "value": "再提问"}]},
        {"foo": "bar"},
        "just a string",
        {"instruction": "写诗", "instances": [{"input": "春", "output": ""}]},
    ]
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    logs = []
    rep = convert_files([src], tmp_path / "o.json", log=logs.append)
    assert rep["records"] == 1 and [p["index"] for p in rep["problems"]] == list(range(1, 9))
    assert all(p["file"] == str(src) for p in rep["problems"])
    assert f"dropped {src} record 2: alpaca: missing field 'output'" in logs
    assert json.loads((tmp_path / "o.json.report.json").read_text(encoding="utf-8"))["dropped"] == 8
    r = subprocess.run([sys.executable, "-m", "corpora", "instructions", "--input", str(src), "--out",
                        str(tmp_path / "s.json"), "--strict"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "record 1" in r.stderr


def test_instructions_malformed_json_names_file_and_line(tmp_path):
    src = tmp_path / "broken.json"
    src.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]', encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "corpora", "instructions", "--input", str(src), "--out",
                        str(tmp_path / "o.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{src}: line 3" in r.stderr and "Traceback" not in r.stderr
    src2 = tmp_path / "broken.jsonl"
    src2.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "corpora", "instructions", "--input", str(src2), "--out",
                        str(tmp_path / "o.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{src2}: line 2" in r.stderr


def test_cli_help():
    for cmd in ("prepare", "instructions"):
        r = subprocess.run([sys.executable, "-m", "corpora", cmd, "--help"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and "--input" in r.stdout
