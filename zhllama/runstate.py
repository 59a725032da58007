"""Which steps of a run folder are done, stale or missing, and why (what `zhllama status` prints, what `zhllama run`
skips).

A step is done when
  - every output is there and finished: a run folder holds result.json (written last by zhllama.runfolder.finish)
    and its artefacts, and its published files are as the run left them (runfolder's record of them);
  - `zhllama run` recorded it in RUN/stages.json (after running the step, or after the step itself found that it was
    up to date) with the same command line, the same recipe sections, the same outside inputs (size and mtime of
    their files), and the outputs as they are now;
  - every step it reads from is done and was recorded before it (a sequence number, not clock times).
Outputs changed behind zhllama's back (a stage run by hand) make the step stale, not wrong: running it again lets
the stage's own check (input hashes and settings against its resolved_config.json) decide whether to redo it.

Public API:
    STATE                                       "stages.json"
    load_state(run) -> dict                     {"seq": n, "options": {...}, "steps": {name: record}}
    save_state(run, state)                      RUN/stages.json, atomically
    record(run, state, step, recipe)        the step ran or was checked: remember it (next sequence number)
    evaluate(run, stages, recipe, state) -> {step name: (status, reason)}   "done" | "stale" | "missing"
    stage_status(stage, per_step) -> (status, reason)    the first not-done step's status and reason
"""
from __future__ import annotations

import json
from pathlib import Path

from zhllama import runfolder

STATE = "stages.json"


def load_state(run) -> dict:
    p = Path(run) / STATE
    try:
        st = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"seq": 0, "steps": {}}
    return st if isinstance(st, dict) and isinstance(st.get("steps"), dict) else {"seq": 0, "steps": {}}


def save_state(run, state: dict) -> None:
    from zhllama.manifest import write_json

    write_json(Path(run) / STATE, state)


def _files_signature(p: Path):
    """[files, bytes, newest mtime] of a file or folder (dot-files and checkpoints left out); None when absent."""
    if p.is_file():
        st = p.stat()
        return [1, st.st_size, st.st_mtime_ns]
    if p.is_dir():
        n = size = newest = 0
        for f in p.rglob("*"):
            rel = f.relative_to(p).parts
            if any(x.startswith(".") or x == "checkpoints" for x in rel) or not f.is_file():
                continue
            st = f.stat()
            n, size, newest = n + 1, size + st.st_size, max(newest, st.st_mtime_ns)
        return [n, size, newest]
    return None


def _output_signature(run: Path, out: str):
    """What says an output changed: a run folder's result.json, else the file itself."""
    p = run / out
    return _files_signature(p / runfolder.RESULT if p.is_dir() else p)


def _sections(recipe_dict: dict, sections) -> dict:
    """The recipe values a step reads, flattened: "pretrain" with "-pretrain.phase2" drops that subsection."""
    flat: dict = {}

    def walk(obj, prefix):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            flat[prefix] = obj

    walk(recipe_dict, "")
    keep = [s for s in sections if not s.startswith("-")]
    drop = [s[1:] for s in sections if s.startswith("-")]
    inside = lambda k, s: k == s or k.startswith(s + ".")  # noqa: E731
    return {k: v for k, v in flat.items() if any(inside(k, s) for s in keep) and not any(inside(k, s) for s in drop)}


def _norm(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _portable(argv, run: Path) -> list:
    """The command with the run folder written {RUN}: a run folder moved or named otherwise keeps its record."""
    r = str(run)
    return [("{RUN}" + a[len(r):]) if a == r or a.startswith(r + "/") else a for a in argv]


def record(run, state: dict, step, recipe) -> None:
    run = Path(run)
    state["seq"] = int(state.get("seq", 0)) + 1
    state["steps"][step.name] = {
        "seq": state["seq"],
        "argv": _portable(step.key(), run),
        "recipe": _norm(_sections(recipe.to_dict(), step.sections)),
        "inputs": {i: _files_signature(Path(i)) for i in step.inputs},
        "outputs": {o: _output_signature(run, o) for o in step.outputs},
    }
    save_state(run, state)


def _own(run: Path, step, rec) -> tuple[str, str]:
    """The step's status from its outputs and its record alone."""
    for out in step.outputs:
        p = run / out
        if not p.exists():
            return "missing", f"missing {p}"
        if p.is_dir():
            if not (p / runfolder.RESULT).is_file():
                return "missing", f"{p} is unfinished (no {runfolder.RESULT})"
            gone = [a for a in step.artefacts if not (p / a).exists()]
            if gone:
                return "missing", f"missing {p / gone[0]}"
            if not runfolder.outputs_unchanged(p):
                return "stale", f"{p}: its files were changed after the run that wrote them"
    if rec is None:
        return "stale", f"no record of the command that made {run / step.outputs[0]} in {run / STATE}"
    argv = _portable(step.key(), run)
    if rec.get("argv") != argv:
        return "stale", "command changed: " + _argv_diff(rec.get("argv") or [], argv)
    return "done", ""


def _argv_diff(old: list, new: list) -> str:
    gone = list(dict.fromkeys(a for a in old if a not in new))
    added = list(dict.fromkeys(a for a in new if a not in old))
    cut = lambda xs: " ".join(xs[:3]) + (f" (+{len(xs) - 3} more)" if len(xs) > 3 else "")  # noqa: E731
    parts = ([f"now {cut(added)}"] if added else []) + ([f"was {cut(gone)}"] if gone else [])
    return "; ".join(parts) or "argument order"


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def evaluate(run, stages, recipe, state: dict) -> dict:
    run = Path(run)
    recs = state.get("steps", {})
    out: dict = {}
    seq: dict = {}
    for stage in stages:
        for step in stage.steps:
            if not step.checked:
                continue
            rec = recs.get(step.name)
            status, why = _own(run, step, rec)
            if status == "done":
                now = _norm(_sections(recipe.to_dict(), step.sections))
                was = rec.get("recipe") or {}
                changed = sorted(k for k in set(now) | set(was) if now.get(k) != was.get(k))
                if changed:
                    k = changed[0]
                    status, why = "stale", f"recipe {k} changed ({_short(was.get(k))} -> {_short(now.get(k))})" + (
                        f" and {len(changed) - 1} more" if len(changed) > 1 else "")
            if status == "done":
                for i in step.inputs:
                    if (rec.get("inputs") or {}).get(i) != _files_signature(Path(i)):
                        status, why = "stale", f"input {i} changed since it was made"
                        break
            if status == "done":
                outs = {o: _output_signature(run, o) for o in step.outputs}
                if _norm(outs) != _norm(rec.get("outputs") or {}):
                    status, why = "stale", f"{run / step.outputs[0]} changed since `zhllama run` checked it"
            if status == "done":
                for dep in step.after:
                    if dep not in out:
                        continue
                    if out[dep][0] != "done":
                        status, why = "stale", f"its input {run / dep} is to be redone"
                        break
                    if seq[dep] > rec.get("seq", 0):
                        status, why = "stale", f"its input {run / dep} was remade after it"
                        break
            out[step.name] = (status, why)
            seq[step.name] = (rec or {}).get("seq", 0)
    return out


def stage_status(stage, per_step: dict) -> tuple[str, str]:
    for step in stage.steps:
        if step.checked and per_step[step.name][0] != "done":
            return per_step[step.name]
    return "done", ""
