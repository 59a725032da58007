"""`zhllama run` and `zhllama status`: the stage graph (zhllama.stages) run step by step, skipping what is done.

Each step that is not done runs as its own process (`python -m vocab build ...`, as a user would type it); the
stage itself then decides between redoing, resuming and finding itself up to date, and the step is recorded in
RUN/stages.json. A stage's wall time goes into RUN/report/timings.json only when the stage ran; a rerun with
nothing to do prints one line and writes nothing.

Public API:
    resolve(options) -> Recipe                  the recipe with the run's --set overrides, validated
    status(options) -> [(stage, status, reason)]
    run(options, only=()) -> int                exit status; only: stage names (their upstream stages run first)
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from zhllama import runstate
from zhllama.errors import UserError
from zhllama.stages import SAMPLE, STAGE_NAMES, Options, stages

TIMINGS = Path("report") / "timings.json"


def resolve(o: Options):
    from zhllama.cli import resolve_recipe

    return resolve_recipe(argparse.Namespace(recipe=o.recipe, config=None, sets=list(o.sets)))


def _graph(o: Options):
    recipe = resolve(o)
    return recipe, stages(o, recipe)


def status(o: Options) -> list:
    run = Path(o.run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    recipe, graph = _graph(o)
    per = runstate.evaluate(run, graph, recipe, runstate.load_state(run))
    return [(s.name, *runstate.stage_status(s, per)) for s in graph]


def _selected(only) -> list:
    """The requested stages and every stage before them (the graph is a chain)."""
    bad = [s for s in only if s not in STAGE_NAMES]
    if bad:
        raise UserError(f"unknown stage {bad[0]!r}; stages: {', '.join(STAGE_NAMES)}")
    if not only:
        return list(STAGE_NAMES)
    last = max(STAGE_NAMES.index(s) for s in only)
    return list(STAGE_NAMES[: last + 1])


def _check_inputs(o: Options) -> None:
    """Outside inputs exist before anything runs (the sample is fetched when the defaults point at it)."""
    default = Options()
    if o.base_tokenizer == default.base_tokenizer and not Path(o.base_tokenizer).exists():
        print(f"fetching the sample inputs into {SAMPLE} (python -m corpora.sample)", flush=True)
        rc = subprocess.call([sys.executable, "-m", "corpora.sample"])
        if rc:
            raise UserError(f"python -m corpora.sample failed (exit {rc}); pass --base-tokenizer and --corpus")
    flags = {"base_tokenizer": "--base-tokenizer", "corpus": "--corpus", "sft_data": "--sft-data",
             "sft_prompts": "--sft-prompts", "base_model": "--base-model", "eval_text": "--eval-text"}
    several = ("corpus", "sft_data", "eval_text")  # space-separated lists of paths
    for name, flag in flags.items():
        v = getattr(o, name)
        for p in (shlex.split(v) or [v]) if name in several else [v]:
            if p and not Path(p).exists():
                raise UserError(f"{flag} {p}: no such file or folder")


def _run_step(run: Path, step) -> int:
    cmd = [sys.executable, "-m", *step.argv]
    shown = "python -m " + shlex.join(step.argv) + (f" > {run / step.stdout_to}" if step.stdout_to else "")
    print(f"  $ {shown}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if step.stdout_to is None:
        return subprocess.call(cmd, env=env)
    from zhllama.runfolder import atomic_file

    target = run / step.stdout_to
    target.parent.mkdir(parents=True, exist_ok=True)
    rc = 1
    try:
        with atomic_file(target) as tmp:
            with open(tmp, "wb") as f:
                rc = subprocess.call(cmd, env=env, stdout=f)
            if rc:
                raise _StepFailed()
    except _StepFailed:
        pass
    return rc


class _StepFailed(Exception):
    """The command failed: its captured output is not published."""


def _write_timings(run: Path, key: str, seconds: float) -> None:
    import json

    from zhllama.manifest import write_json

    path = run / TIMINGS
    try:
        t = json.loads(path.read_text(encoding="utf-8"))
        t = t if isinstance(t, dict) else {}
    except (OSError, ValueError):
        t = {}
    t.pop("total", None)
    t[key] = round(seconds)
    t["total"] = sum(v for v in t.values() if isinstance(v, (int, float)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, t)


def run(o: Options, only=()) -> int:
    from zhllama.runfolder import ensure_writable, lock

    names = _selected(only)
    recipe, graph = _graph(o)
    graph = [s for s in graph if s.name in names]
    runpath = Path(o.run)
    ensure_writable(runpath)
    with lock(runpath, name=".run.lock"):
        state = runstate.load_state(runpath)
        per = runstate.evaluate(runpath, graph, recipe, state)
        todo = [s for s in graph if runstate.stage_status(s, per)[0] != "done"]
        if not todo:
            print(f"{runpath}: up to date ({', '.join(names)}); nothing to do", flush=True)
            return 0
        _check_inputs(o)
        state["options"] = o.to_dict()
        runstate.save_state(runpath, state)
        n = len(graph)
        t_all, ran_stages = time.time(), []
        for i, stage in enumerate(graph, 1):
            st, why = runstate.stage_status(stage, runstate.evaluate(runpath, graph, recipe, state))
            if st == "done":
                print(f"[{i}/{n}] {stage.name}: up to date", flush=True)
                continue
            print(f"[{i}/{n}] {stage.name}: running ({why})", flush=True)
            t0 = time.time()
            ran = []
            for step in stage.steps:
                if step.checked and runstate.evaluate(runpath, graph, recipe, state)[step.name][0] == "done":
                    continue
                rc = _run_step(runpath, step)
                if rc:
                    how = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
                    print(f"[{i}/{n}] {stage.name}: failed at {step.name} ({how}); what finished is kept - fix the "
                          "problem above and run again", file=sys.stderr, flush=True)
                    return 128 - rc if rc < 0 else rc  # a shell's status for a process killed by a signal
                ran.append(step.name)
                if step.checked:
                    runstate.record(runpath, state, step, recipe)
            dt = time.time() - t0
            if stage.name != "report":
                _write_timings(runpath, stage.timing, dt)
            print(f"[{i}/{n}] {stage.name}: done in {dt:.0f} s ({', '.join(ran)})", flush=True)
            ran_stages.append(stage.name)
        print(f"{runpath}: done in {time.time() - t_all:.0f} s (ran {', '.join(ran_stages)}; up to date: "
              f"{', '.join(s.name for s in graph if s.name not in ran_stages) or 'none'})", flush=True)
    return 0
