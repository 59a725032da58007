"""Pretraining tokenization/packing on datatrove: work units, blocks independent of tasks/workers, the cache built once
under torchrun, kill -9 and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, kill9_then_rerun_matches, make_chinese_lines, write_lines, write_text_records
from test_pretrain_core import _env, setup  # noqa: F401  (the session fixture: tiny model + extended tokenizer)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """One .txt and one .jsonl, each larger than the small unit size the tests set (so each is several units)."""
    d = tmp_path_factory.mktemp("bigzh")
    write_lines(d / "a.txt", make_chinese_lines(6000, 11))
    write_text_records(d / "b.jsonl", make_chinese_lines(2000, 12))
    write_lines(d / "c.txt", make_chinese_lines(300, 13), end="")  # one unit, no final newline
    return d


def test_byte_range_units_yield_every_document_once(big_corpus):
    from corpora.reader import iter_documents
    from pretrain.units import plan_units, unit_documents

    for name in ("a.txt", "b.jsonl"):
        f = big_corpus / name
        data = f.read_bytes()
        # unit sizes that put boundaries inside lines, and right after a newline
        for size in (4093, 10_000, data.index(b"\n") + 1):
            units = plan_units([f], {f: "utf-8"}, {f: "0" * 64}, size=size)
            assert len(units) > 3 and units[-1].end == len(data)
            got = [d for u in units for d in unit_documents(u)]
            assert got == list(iter_documents(f)), (name, size)


def _reference_blocks(tok_dir, files, block_size, eval_ratio):
    """What one pass over each file gives: documents + EOS concatenated and cut, the tail dropped."""
    from transformers import AutoTokenizer

    from corpora.reader import iter_documents
    from pretrain.data import _is_eval

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    out = []
    for f in files:
        ids = []
        for d in iter_documents(f):
            if not _is_eval(d, eval_ratio):
                ids += tok(d)["input_ids"] + [tok.eos_token_id]
        out += [ids[i:i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    return out


def test_blocks_identical_for_num_proc_1_and_2_and_match_one_pass_per_unit(setup, big_corpus, tmp_path, monkeypatch):
    from pretrain.data import build_datasets

    monkeypatch.setenv("ZHLLAMA_PRETRAIN_UNIT_BYTES", "40000")
    runs = {}
    for n in (1, 2):
        tr, ev, info = build_datasets([big_corpus], setup["tok"], 32, tmp_path / f"n{n}", eval_ratio=0.02,
                                      max_eval_blocks=50, num_proc=n, progress=False)
        assert not info["reused_cache"] and info["units"] > 6 and info["built_units"] == info["units"]
        runs[n] = ([r["input_ids"] for r in tr], [r["input_ids"] for r in ev], info)
    assert runs[1][0] == runs[2][0] and runs[1][1] == runs[2][1] and len(runs[1][1]) == 50
    assert runs[1][2]["cache_key"] == runs[2][2]["cache_key"]  # num_proc is not part of the key
    c1, c2 = (Path(runs[n][2]["cache_dir"]) / "units" for n in (1, 2))
    bins = sorted(p.name for p in c1.glob("*.bin"))
    assert bins == sorted(p.name for p in c2.glob("*.bin"))
    assert all((c1 / b).read_bytes() == (c2 / b).read_bytes() for b in bins)
    # the single-unit file gives exactly the blocks a whole-file pass gives (what the cache held before units)
    from pretrain.data import build_datasets as b

    small, _, _ = b([big_corpus / "c.txt"], setup["tok"], 32, tmp_path / "small", eval_ratio=0.02, progress=False)
    assert [r["input_ids"] for r in small] == _reference_blocks(setup["tok"], [big_corpus / "c.txt"], 32, 0.02)
    # the second call reads the finished cache, and the rows are what the shard files hold
    tr, _, again = build_datasets([big_corpus], setup["tok"], 32, tmp_path / "n1", eval_ratio=0.02,
                                  max_eval_blocks=50, num_proc=1, progress=False)
    assert again["reused_cache"] and len(tr) == len(runs[1][0]) == again["train_blocks"]
    first = sorted(c1.glob("*.train.bin"))[0]
    assert np.fromfile(first, "<i4")[:32].tolist() in runs[1][0]


def _cache_cmd(setup, corpus, cache, *extra):
    return [sys.executable, "-m", "pretrain", "cache", "--recipe", str(setup["recipe"]), "--tokenizer", str(setup["tok"]),
            "--corpus", str(corpus), "--cache-dir", str(cache), *extra]


def test_kill9_during_tokenization_resumes_from_finished_units(setup, big_corpus, tmp_path):
    env = dict(_env(), ZHLLAMA_PRETRAIN_UNIT_BYTES="8000")
    ref = subprocess.run(_cache_cmd(setup, big_corpus, tmp_path / "ref", "--num-proc", "1"), env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_info = json.loads(ref.stdout.strip().splitlines()[-1])
    n_units = ref_info["units"]
    assert n_units > 40 and ref_info["built_units"] == n_units

    cache = tmp_path / "cut"
    proc = subprocess.Popen(_cache_cmd(setup, big_corpus, cache, "--num-proc", "2"), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    records = lambda: list(cache.glob("*/units/*.json"))  # noqa: E731
    while len(records()) < 5 and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, mid-unit
    proc.wait()
    time.sleep(0.2)
    before = {p.name: p.read_text() for p in records()}
    assert 5 <= len(before) < n_units and not list(cache.glob("*/complete.json"))
    again = subprocess.run(_cache_cmd(setup, big_corpus, cache, "--num-proc", "2"), env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    info = json.loads(again.stdout.strip().splitlines()[-1])
    assert not info["reused_cache"] and info["built_units"] == n_units - len(before)
    assert all((cache / info["cache_dir"].split("/")[-1] / "units" / n).read_text() == t for n, t in before.items())
    # nothing half-written is left, and every shard equals the uninterrupted build's
    units = cache / Path(info["cache_dir"]).name / "units"
    assert not list(units.glob("*.tmp-*"))
    # resumed through the engine: every rank (one per unit) has its completion marker, the killed run's included
    assert len(list(units.parent.glob(f"pipeline/tasks-{n_units}/completions/*"))) == n_units
    ref_units = Path(ref_info["cache_dir"]) / "units"
    bins = sorted(p.name for p in ref_units.glob("*.bin"))
    assert bins == sorted(p.name for p in units.glob("*.bin"))
    assert all((ref_units / b).read_bytes() == (units / b).read_bytes() for b in bins)


@pytest.mark.parametrize("tasks,workers", [(1, 1), (2, 2), (4, 2)])
def test_cache_is_byte_identical_for_1_2_and_4_datatrove_tasks(setup, big_corpus, tmp_path, monkeypatch, tasks,
                                                               workers):
    """Units dealt round-robin over 1, 2 or 4 datatrove ranks give the shards, records and index of one rank per
    unit (the default); each rank is marked complete by the engine."""
    from pretrain.data import build_cache
    from zhllama.executors import ExecutorConfig

    monkeypatch.setenv("ZHLLAMA_PRETRAIN_UNIT_BYTES", "40000")
    kw = dict(eval_ratio=0.02, max_eval_blocks=50, progress=False)
    ref = build_cache([big_corpus], setup["tok"], 32, tmp_path / "ref", num_proc=1, **kw)
    got = build_cache([big_corpus], setup["tok"], 32, tmp_path / "got", executor=ExecutorConfig(tasks=tasks,
                      workers=workers), **kw)
    assert got["built_units"] == got["units"] == ref["units"] > tasks and got["num_proc"] == workers
    r, g = Path(ref["cache_dir"]), Path(got["cache_dir"])
    assert r.name == g.name
    files = sorted(p.name for p in (r / "units").glob("*.bin"))
    assert files == sorted(p.name for p in (g / "units").glob("*.bin")) and len(files) == 2 * ref["units"]
    assert all((r / "units" / f).read_bytes() == (g / "units" / f).read_bytes() for f in files)
    assert (r / "complete.json").read_text() == (g / "complete.json").read_text()
    assert sorted(p.name for p in (g / "pipeline" / f"tasks-{tasks}" / "completions").iterdir()) == \
        [f"{i:05d}" for i in range(tasks)]
    # the engine's task logs, not zhllama's stderr, hold datatrove's console output
    assert (g / "pipeline" / f"tasks-{tasks}" / "logs" / "task_00000.log").is_file()


def test_other_training_ranks_wait_for_rank_0_and_build_nothing(setup, big_corpus, tmp_path, monkeypatch):
    """RANK 1 of 2 never runs the build: it waits until rank 0's complete.json exists and reads that cache."""
    import shutil
    import threading

    from pretrain import data

    monkeypatch.setattr(data, "_POLL_S", 0.05)
    f = big_corpus / "c.txt"
    _, _, info = data.build_datasets([f], setup["tok"], 32, tmp_path / "ref", eval_ratio=0.02, progress=False)
    ref = Path(info["cache_dir"])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    live = tmp_path / "live" / info["cache_key"]

    def rank0():  # what rank 0 leaves once its build is done
        time.sleep(1.0)
        shutil.copytree(ref / "units", live / "units")
        shutil.copy(ref / "complete.json", live / "complete.json")

    t = threading.Thread(target=rank0)
    t.start()
    t0 = time.time()
    tr, _, waited = data.build_datasets([f], setup["tok"], 32, tmp_path / "live", eval_ratio=0.02, progress=False)
    t.join()
    assert waited["built_units"] == 0 and time.time() - t0 >= 1.0 and len(tr) == info["train_blocks"]
    assert not (live / "pipeline").exists()  # no executor ran on this rank
    builds = (live / "units" / "builds.jsonl").read_text().splitlines()
    assert len(builds) == 1 and json.loads(builds[0])["rank"] == 0


def test_a_finished_task_whose_output_was_removed_is_redone(setup, big_corpus, tmp_path, monkeypatch):
    """datatrove trusts its completion markers; a unit deleted after its task finished is built again, not lost."""
    from pretrain.data import build_cache

    monkeypatch.setenv("ZHLLAMA_PRETRAIN_UNIT_BYTES", "40000")
    kw = dict(eval_ratio=0.02, max_eval_blocks=50, progress=False, num_proc=1)
    info = build_cache([big_corpus], setup["tok"], 32, tmp_path / "c", **kw)
    cache = Path(info["cache_dir"])
    victim = sorted((cache / "units").glob("*.json"))[2]
    shards = {p: p.read_bytes() for p in (cache / "units").glob(victim.name.replace(".json", ".*.bin"))}
    victim.unlink()
    (cache / "complete.json").unlink()
    again = build_cache([big_corpus], setup["tok"], 32, tmp_path / "c", **kw)
    assert again["built_units"] == 1 and victim.is_file() and (cache / "complete.json").is_file()
    assert all(p.read_bytes() == b for p, b in shards.items())


@pytest.mark.slow
def test_torchrun_two_ranks_build_a_new_cache_once_and_train(setup, big_corpus, tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "pretrain", "phase1", "--recipe", str(setup["recipe"]), "--model", str(setup["resized"]),
           "--corpus", str(big_corpus), "--out", str(tmp_path / "p1"), "--cache-dir", str(cache),
           "--max-steps", "3", "--save-steps", "100", "--num-proc", "2"]
    env = dict(_env(), ZHLLAMA_PRETRAIN_UNIT_BYTES="8000")
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "p1" / "result.json").read_text())
    assert res["global_step"] == 3 and res["world_size"] == 2
    [key] = [p for p in cache.iterdir() if p.is_dir()]
    builds = [json.loads(x) for x in (key / "units" / "builds.jsonl").read_text().splitlines()]
    uids = [b["uid"] for b in builds]
    n_units = len(list((key / "units").glob("*.json")))
    assert n_units > 40 and len(uids) == len(set(uids)) == n_units  # every unit built, and exactly once
    assert (key / "complete.json").is_file() and not list(key.glob("complete.json.tmp-*"))
    assert {b["rank"] for b in builds} == {0}  # training rank 0 ran the pipeline; rank 1 waited
    assert len(list((key / "pipeline" / f"tasks-{n_units}" / "completions").iterdir())) == n_units


def test_streaming_is_a_seeded_shuffle_of_the_cached_blocks(setup, big_corpus, tmp_path, monkeypatch):
    from pretrain.data import build_datasets

    monkeypatch.setenv("ZHLLAMA_PRETRAIN_UNIT_BYTES", "40000")
    cached, cached_ev, _ = build_datasets([big_corpus], setup["tok"], 32, tmp_path / "c", eval_ratio=0.02,
                                          max_eval_blocks=50, progress=False)
    order = {}
    for seed in (1, 1, 2):
        tr, ev, info = build_datasets([big_corpus], setup["tok"], 32, tmp_path / "s", eval_ratio=0.02,
                                      max_eval_blocks=50, streaming=True, seed=seed, shuffle_buffer=64)
        assert info["streaming"] and [r["input_ids"] for r in ev] == [r["input_ids"] for r in cached_ev]
        rows = [r["input_ids"] for r in tr]
        if seed in order:
            assert rows == order[seed]  # same seed, same order: what a resumed run relies on
        order[seed] = rows
    plain = [r["input_ids"] for r in cached]
    assert sorted(order[1]) == sorted(plain)  # the same blocks as the cache, each once
    assert order[1] != plain and order[2] != order[1]
    assert order[1][:50] != plain[:50]  # the first batches do not come from the first file in order
    assert not (tmp_path / "s").exists()  # streaming writes no cache


@pytest.mark.slow
def test_streaming_kill9_then_rerun_gives_identical_adapter(setup, big_corpus, tmp_path):
    from test_pretrain_core import _phase2_cmd

    run = tmp_path / "run"
    args = ("--max-steps", "8", "--save-steps", "2", "--streaming", "--shuffle-buffer", "50")
    cmd = [x if x != str(setup["corpus"]) else str(big_corpus) for x in _phase2_cmd(setup, run, *args)]
    kill9_then_rerun_matches(cmd, run, tmp_path, dict(_env(), ZHLLAMA_PRETRAIN_UNIT_BYTES="40000"))


@pytest.mark.slow
def test_torchrun_two_ranks_streaming_trains_to_the_end(setup, big_corpus, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "pretrain", "phase1", "--recipe", str(setup["recipe"]), "--model", str(setup["resized"]),
           "--corpus", str(big_corpus), "--out", str(tmp_path / "p1"), "--cache-dir", str(tmp_path / "c"),
           "--max-steps", "3", "--save-steps", "100", "--streaming", "--shuffle-buffer", "50"]
    r = subprocess.run(cmd, env=dict(_env(), ZHLLAMA_PRETRAIN_UNIT_BYTES="40000"), cwd=ROOT, capture_output=True,
                       text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "p1" / "result.json").read_text())
    # 3 steps of 4 sequences of 32 tokens, split over the two ranks
    assert res["global_step"] == 3 and res["world_size"] == 2 and res["tokens_seen"] == 3 * 4 * 32
    assert not (tmp_path / "c").exists()  # streaming builds no cache
