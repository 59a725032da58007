"""`zhllama`: one command for the pipeline. One tiny run (the tiny recipe shrunk with --set, the small fixture corpus)
goes through `zhllama run` once; then: `zhllama status` says all done, a second run (and `make vocab pretrain sft`
with the same variables) does nothing and leaves timings and report byte-identical, a deleted RUN/sft/merged makes
exactly sft, eval and report to redo, a changed learning rate in the recipe file pretrain and everything after it.
The stage commands are forwarded unchanged."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

SETS = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=4",
        "model.num_key_value_heads=2", "model.max_position_embeddings=128", "model.base_vocab_size=600",
        "vocab.num_added=500", "vocab.character_coverage=0.7", "pretrain.block_size=32", "pretrain.max_eval_blocks=4",
        "sft.max_length=128"]
for _sec in ("pretrain.phase1", "pretrain.phase2", "sft"):
    SETS += [f"{_sec}.max_steps=3", f"{_sec}.global_batch_size=4", f"{_sec}.per_device_batch_size=4",
             f"{_sec}.logging_steps=1", f"{_sec}.save_steps=100", f"{_sec}.eval_steps=100"]
STAGES = ["prepare", "vocab", "pretrain", "sft", "eval", "report"]


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def zhllama(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zhllama", *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _status(text: str) -> dict:
    """{stage: "done" | "stale: ..." | "missing: ..."} from `zhllama status` output."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^  (\w+)\s+(\S.*)$", text, re.M)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_base, zh_corpus):
    d = tmp_path_factory.mktemp("zhllama_run")
    recipe = d / "recipes" / "tiny.yaml"  # a copy: the tests edit its learning rate
    recipe.parent.mkdir()
    shutil.copy2(ROOT / "recipes" / "tiny.yaml", recipe)
    run = d / "run"
    opts = ["--run", run, "--recipe", recipe, "--base-tokenizer", tiny_base, "--corpus", zh_corpus,
            "--prepare-args=--num-proc 1", *[x for s in SETS for x in ("--set", s)]]
    r = zhllama("run", *opts, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"run": run, "recipe": recipe, "opts": opts, "out": r.stdout}


@pytest.mark.slow
def test_first_run_runs_every_stage_and_times_it(tiny_run):
    out = tiny_run["out"]
    for i, s in enumerate(STAGES, 1):
        assert re.search(rf"^\[{i}/6\] {s}: running \(missing .*\)$", out, re.M), s
        assert re.search(rf"^\[{i}/6\] {s}: done in \d+ s \(", out, re.M), s
    import json

    t = json.loads((tiny_run["run"] / "report" / "timings.json").read_text())
    assert set(t) == {"prepare", "vocab", "pretrain", "sft (convert, train, merge, answers)",
                      "eval (bits per character)", "total"}
    assert t["total"] == sum(v for k, v in t.items() if k != "total")
    assert (tiny_run["run"] / "report.md").is_file() and (tiny_run["run"] / "report.html").is_file()
    assert out.splitlines()[-1].startswith(f"{tiny_run['run']}: done in ")
    assert out.splitlines()[-1].endswith(f"(ran {', '.join(STAGES)}; up to date: none)")


@pytest.mark.slow
def test_status_of_a_finished_run_is_all_done(tiny_run):
    r = zhllama("status", tiny_run["run"])
    assert r.returncode == 0, r.stderr
    assert _status(r.stdout) == {s: "done" for s in STAGES}
    assert r.stdout.rstrip().endswith("all stages done")


def _fingerprint(run: Path) -> dict:
    files = [run / "report" / "timings.json", run / "report.md", run / "report.html", run / "stages.json"]
    files += sorted(run.glob("**/result.json"))
    return {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


@pytest.mark.slow
def test_second_run_is_a_noop(tiny_run):
    run = tiny_run["run"]
    before = _fingerprint(run)
    t0 = time.time()
    r = zhllama("run", *tiny_run["opts"])
    took = time.time() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{run}: up to date ({', '.join(STAGES)}); nothing to do"]
    assert took < 30  # the bound for an unchanged rerun
    assert _fingerprint(run) == before  # timings.json, the report and every result.json untouched


@pytest.mark.slow
def test_make_stage_targets_with_the_variables_are_noops(tiny_run):
    run = tiny_run["run"]
    before = _fingerprint(run)
    variables = [f"PY={sys.executable}", f"RUN={run}", f"RECIPE={tiny_run['recipe']}",
                 f"BASE_TOKENIZER={tiny_run['opts'][5]}", f"CORPUS={tiny_run['opts'][7]}",
                 "PREPARE_ARGS=--num-proc 1", "SET=" + " ".join(SETS)]
    r = subprocess.run(["make", "--no-print-directory", "-s", "-o", "setup", "vocab", "pretrain", "sft", *variables],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.splitlines() == [f"{run}: up to date ({', '.join(STAGES[:i])}); nothing to do" for i in (2, 3, 4)]
    assert _fingerprint(run) == before
    r = subprocess.run(["make", "--no-print-directory", "-s", "-o", "setup", "status", *variables], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and _status(r.stdout) == {s: "done" for s in STAGES}, r.stdout + r.stderr


@pytest.mark.slow
def test_status_after_deleting_the_merged_model(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run["run"], copy, symlinks=True)  # keeps mtimes: the copy is as done as the original
    assert _status(zhllama("status", copy).stdout) == {s: "done" for s in STAGES}
    shutil.rmtree(copy / "sft" / "merged")
    r = zhllama("status", copy)
    assert r.returncode == 0, r.stderr
    st = _status(r.stdout)
    assert st["sft"] == f"missing: missing {copy}/sft/merged"
    assert {s for s, v in st.items() if v != "done"} == {"sft", "eval", "report"}
    assert st["eval"].startswith("stale: ") and st["report"].startswith("stale: ")
    assert r.stdout.rstrip().endswith("to redo: sft, eval, report (zhllama run)")


@pytest.mark.slow
def test_status_after_changing_the_recipe_learning_rate(tiny_run):
    recipe = tiny_run["recipe"]
    text = recipe.read_text(encoding="utf-8")
    assert "learning_rate: 1.0e-2" in text
    try:
        recipe.write_text(text.replace("learning_rate: 1.0e-2", "learning_rate: 5.0e-3", 1), encoding="utf-8")
        r = zhllama("status", tiny_run["run"])
    finally:
        recipe.write_text(text, encoding="utf-8")
    assert r.returncode == 0, r.stderr
    st = _status(r.stdout)
    assert st["pretrain"] == "stale: recipe pretrain.phase1.learning_rate changed (0.01 -> 0.005)"
    assert {s for s, v in st.items() if v != "done"} == {"pretrain", "sft", "eval", "report"}
    assert r.stdout.rstrip().endswith("to redo: pretrain, sft, eval, report (zhllama run)")
    # the same question asked with --set, and an SFT-only change leaves pretrain alone
    st = _status(zhllama("status", tiny_run["run"], "--set", "pretrain.phase2.learning_rate=1e-3").stdout)
    assert st["pretrain"] == "stale: recipe pretrain.phase2.learning_rate changed (0.002 -> 0.001)"
    st = _status(zhllama("status", tiny_run["run"], "--set", "sft.learning_rate=1e-3").stdout)
    assert {s for s, v in st.items() if v != "done"} == {"sft", "eval", "report"}
    assert st["sft"].startswith("stale: recipe sft.learning_rate changed")


def test_help_names_every_command():
    r = zhllama("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("run", "status", "corpora", "vocab", "pretrain", "sft", "eval", "deploy"):
        assert re.search(rf"^    {cmd}\s", r.stdout, re.M), cmd
    for cmd in ("run", "status"):
        assert zhllama(cmd, "--help").returncode == 0


@pytest.mark.parametrize("cmd,module,sub", [("corpora", "corpora", "prepare"), ("vocab", "vocab", "build"),
                                            ("pretrain", "pretrain", "phase1"), ("sft", "sft", "train"),
                                            ("eval", "evaluation", "bpc"), ("deploy", "deploy", "serve")])
def test_stage_commands_are_forwarded(cmd, module, sub):
    via = zhllama(cmd, sub, "--help")
    direct = subprocess.run([sys.executable, "-m", module, sub, "--help"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert via.returncode == direct.returncode == 0, via.stderr + direct.stderr
    assert via.stdout == direct.stdout


def test_console_script_is_declared():
    import importlib
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["zhllama"]
    mod, fn = target.split(":")
    assert callable(getattr(importlib.import_module(mod), fn))


def test_bad_input_is_one_line_exit_2(tmp_path, tiny_base):
    r = zhllama("run", "--run", tmp_path / "run", "--base-tokenizer", tiny_base, "--corpus", tmp_path / "nope")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"error: --corpus {tmp_path / 'nope'}: no such file or folder"]
    assert not (tmp_path / "run" / "corpus").exists()
    r = zhllama("run", "train", "--run", tmp_path / "run")
    assert (r.returncode, r.stderr.strip()) == (
        2, "error: unknown stage 'train'; stages: prepare, vocab, pretrain, sft, eval, report")
    r = zhllama("status", tmp_path / "absent")
    assert (r.returncode, r.stderr.strip()) == (2, f"error: {tmp_path / 'absent'}: no such run folder")
    r = zhllama("run", "--run", tmp_path / "run", "--set", "pretrain.phase1.learning_rate=-1")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "learning_rate" in r.stderr, r.stderr


@pytest.mark.slow
def test_run_after_deleting_the_merged_model_redoes_only_that(tiny_run):
    """Last in this file: it changes the shared run (and puts it back to all done)."""
    import json

    run = tiny_run["run"]
    timings = json.loads((run / "report" / "timings.json").read_text())
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.glob("*/**/result.json"))
            if "merged" not in p.parts}
    shutil.rmtree(run / "sft" / "merged")
    r = zhllama("run", *tiny_run["opts"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert lines[:3] == ["[1/6] prepare: up to date", "[2/6] vocab: up to date", "[3/6] pretrain: up to date"]
    assert lines[3] == f"[4/6] sft: running (missing {run}/sft/merged)"
    assert re.fullmatch(r"\[4/6\] sft: done in \d+ s \(sft/merged, sft answers\)", lines[4]), lines[4]
    assert lines[5].startswith("[5/6] eval: running (") and lines[7].startswith("[6/6] report: running (")
    # the stages that did not run keep their results and their recorded seconds
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == kept
    now = json.loads((run / "report" / "timings.json").read_text())
    assert {k: now[k] for k in ("prepare", "vocab", "pretrain")} == {k: timings[k] for k in ("prepare", "vocab", "pretrain")}
    assert now["total"] == sum(v for k, v in now.items() if k != "total")
    assert _status(zhllama("status", run).stdout) == {s: "done" for s in STAGES}


def test_up_to_date_rule_on_a_small_graph(tmp_path):
    """zhllama.runstate on two hand-made steps (no training): each reason a step is missing or stale."""
    from zhllama import runstate
    from zhllama.recipe import load_recipe, set_path
    from zhllama.stages import Stage, Step

    run, ext = tmp_path / "run", tmp_path / "data.txt"
    ext.write_text("one\n")
    run.mkdir()

    def graph(argv_a=("x", "a")):
        a = Step("a", [*argv_a, "--out", str(run / "a")], outputs=("a",), artefacts=("w.bin",), sections=("vocab",))
        b = Step("b", ["x", "b", "--in", str(ext)], outputs=("b.json",), after=("a",), sections=("sft",),
                 inputs=(str(ext),))
        return [Stage("A", "A", [a]), Stage("B", "B", [b])]

    recipe = load_recipe("tiny")
    state = runstate.load_state(run)

    def status(g=None, r=None, where=run):
        return runstate.evaluate(where, g or graph(), r or recipe, state)

    assert status() == {"a": ("missing", f"missing {run}/a"), "b": ("missing", f"missing {run}/b.json")}
    (run / "a").mkdir()
    (run / "a" / "w.bin").write_bytes(b"w")
    assert status()["a"] == ("missing", f"{run}/a is unfinished (no result.json)")
    (run / "a" / "result.json").write_text("{}")
    assert status()["a"] == ("stale", f"no record of the command that made {run}/a in {run}/stages.json")
    runstate.record(run, state, graph()[0].steps[0], recipe)
    assert status()["a"] == ("done", "")
    (run / "b.json").write_text("{}")
    runstate.record(run, state, graph()[1].steps[0], recipe)
    assert status() == {"a": ("done", ""), "b": ("done", "")}
    # the record is kept in RUN/stages.json and survives a moved run folder
    state = runstate.load_state(run)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    assert {k: v[0] for k, v in runstate.evaluate(moved, graph(), recipe, state).items()} == {"a": "stale", "b": "stale"}
    # (graph() names the old folder in its commands: the same commands with the new folder are done)
    run, run_old = moved, run
    assert status(where=moved) == {"a": ("done", ""), "b": ("done", "")}
    run = run_old

    changed = load_recipe("tiny")
    set_path(changed, "vocab.num_added", 100)
    assert status(r=changed) == {"a": ("stale", "recipe vocab.num_added changed (17953 -> 100)"),
                                 "b": ("stale", f"its input {run}/a is to be redone")}
    set_path(changed, "vocab.num_added", 17953)
    set_path(changed, "pretrain.phase1.learning_rate", 0.5)  # a section neither step reads
    assert status(r=changed) == {"a": ("done", ""), "b": ("done", "")}
    assert status(g=graph(("x", "a", "--fast"))) == {
        "a": ("stale", "command changed: now --fast"), "b": ("stale", f"its input {run}/a is to be redone")}
    (run / "a" / "w.bin").unlink()
    assert status()["a"] == ("missing", f"missing {run}/a/w.bin")
    (run / "a" / "w.bin").write_bytes(b"w")
    ext.write_text("two\n")
    assert status()["b"] == ("stale", f"input {ext} changed since it was made")
    runstate.record(run, state, graph()[1].steps[0], recipe)
    assert status()["b"] == ("done", "")
    # a reran (or found itself up to date and was recorded again): b, recorded before it, is to be checked
    runstate.record(run, state, graph()[0].steps[0], recipe)
    assert status() == {"a": ("done", ""), "b": ("stale", f"its input {run}/a was remade after it")}
    (run / "b.json").write_text('{"x": 1}')
    assert status()["b"] == ("stale", f"{run}/b.json changed since `zhllama run` checked it")
    stage = runstate.stage_status(graph()[1], status())
    assert stage == ("stale", f"{run}/b.json changed since `zhllama run` checked it")
