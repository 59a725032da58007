"""Answers of one model to a prompt set, for the judge: JSONL in, JSONL out, resumable.

Prompt rows: {"id", "category", "prompt"} or, for a multi-turn conversation, {"id", "category", "turns": [...]}
(each turn is answered in turn; earlier turns and the model's own answers are kept in the template's
conversation format, like `sft chat`). The project's own set (evaluation/data/prompts_zh.jsonl) covers the
paper's ten task types with ten prompts each. Output rows add "answer" (the last turn's), "answers" (all
turns), "model" and "preset"; rows already in OUT (same id, model and preset) are kept and not redone.
"""
from __future__ import annotations

import json
from pathlib import Path

from zhllama.errors import UserError

DEFAULT_PROMPTS = Path(__file__).with_name("data") / "prompts_zh.jsonl"


def read_prompts(path) -> list[dict]:
    from corpora.reader import parse_jsonl

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such prompts file")
    rows = parse_jsonl(path, path.read_text(encoding="utf-8"), 'objects {"id", "category", "prompt"} or {"id", "category", "turns": [...]}')
    seen = set()
    for i, r in enumerate(rows, 1):
        where = f"{path}: record {i}"
        if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not r["id"]:
            raise UserError(f"{where}: expected an object with a string field 'id'")
        if r["id"] in seen:
            raise UserError(f"{where}: duplicate id {r['id']!r}")
        seen.add(r["id"])
        turns = r.get("turns", [r.get("prompt")] if "prompt" in r else None)
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise UserError(f"{where} ({r['id']}): needs a non-empty string 'prompt' or a list of strings 'turns'")
        r.setdefault("category", "uncategorized")
    return rows


def _done(out: Path, model: str, preset: str) -> dict[str, dict]:
    if not out.is_file():
        return {}
    done = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run is redone
        if isinstance(r, dict) and r.get("model") == model and r.get("preset") == preset and "answer" in r:
            done[r["id"]] = r
    return done


def run(model, tok, template: str, prompts: list[dict], out, model_name: str, preset: str, max_new_tokens: int = 400,
        seed: int = 0, progress: bool = True) -> list[dict]:
    from zhllama.chat import get
    from zhllama.runfolder import writing

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(out.suffix + ".partial")
    done = _done(out, model_name, preset) | _done(partial, model_name, preset)   # an interrupted run left .partial
    rows = []
    t = get(template)
    try:
        with writing(out):  # a full disk or read-only folder: one line naming OUT
            _answer_all(model, tok, t, prompts, partial, done, rows, model_name, preset, template, max_new_tokens,
                        seed, progress)
            partial.replace(out)
    except BaseException:
        # finished answers stay in OUT.partial for the rerun to resume from; an empty one is no progress
        if partial.is_file() and partial.stat().st_size == 0:
            partial.unlink()
        raise
    return rows


def _answer_all(model, tok, t, prompts, partial, done, rows, model_name, preset, template, max_new_tokens, seed,
                progress):
    from tqdm import tqdm

    from sft.generate import generate

    with open(partial, "w", encoding="utf-8") as f:
        for r in tqdm(prompts, desc="generate", unit="prompt", disable=not progress):
            if r["id"] in done:
                row = done[r["id"]]
            else:
                turns = r.get("turns") or [r["prompt"]]
                history, answers = [], []
                for q in turns:
                    a = generate(model, tok, t.render_conversation(history, q), preset=preset,
                                 max_new_tokens=max_new_tokens, seed=seed).strip()
                    history.append((q, a))
                    answers.append(a)
                row = {k: v for k, v in r.items()} | {"answer": answers[-1], "answers": answers, "model": model_name,
                                                      "preset": preset, "template": template}
            rows.append(row)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
