"""`corpora instructions`: instruction data in common shapes -> validated Alpaca records.

Accepted record shapes (with --format auto, decided per record from its fields):
  alpaca    {instruction, input?, output}
  belle     {question, std_answer} (BELLE eval sets); {instruction, instances: [{input, output}, ...]}
            (BELLE/self-instruct seed tasks: one record per instance)
  pclue     {input, target}
  sharegpt  {conversations: [{from, value}, ...]} or {messages: [{role, content}, ...]}

ShareGPT conversations with one exchange and no system turn become an Alpaca record; longer ones (or
with a system turn) are kept as conversations, ``{"messages": [{"role": "system"|"user"|"assistant",
"content"}]}``, which `sft train` trains with the loss on every assistant turn. Conversations that do
not alternate user/assistant, or end on a user turn, are rejected.

Texts are kept verbatim (whitespace is only looked at to reject empty fields) and nothing is
deduplicated, so converting Alpaca data is lossless.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from corpora.reader import has_lone_surrogate, parse_jsonl
from zhllama.errors import UserError
from zhllama.manifest import write_json

FORMATS = ("alpaca", "belle", "pclue", "sharegpt")
_USER = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bing", "bard", "model"}
_SYSTEM = {"system"}


def read_records(path: Path) -> list:
    """A JSON array (or an object holding one under "data") or JSONL; errors name the file and line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}, byte offset {e.start}: not valid UTF-8 "
                        "(convert it, e.g. `iconv -f GB18030 -t UTF-8`)") from None
    head = text.lstrip()[:1]
    if head in ("[", "") or (head == "{" and not path.name.endswith(".jsonl")):
        try:
            data = json.loads(text) if head else []
        except json.JSONDecodeError as e:
            if head == "{":  # maybe JSONL named .json: fall through to line-by-line parsing
                data = None
            else:
                raise UserError(f"{path}: line {e.lineno}, column {e.colno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return data["data"]
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            return [data]
    return parse_jsonl(path, text, "a JSON array or one JSON object per line")


def detect_format(rec: dict) -> str | None:
    if "conversations" in rec or "messages" in rec:
        return "sharegpt"
    if "instances" in rec or ("question" in rec and "std_answer" in rec):
        return "belle"
    if "instruction" in rec:
        return "alpaca"
    if "target" in rec and "input" in rec:
        return "pclue"
    return None


def _str(rec: dict, key: str, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return ""
    v = rec[key]
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string, got {type(v).__name__}")
    if has_lone_surrogate(v):
        raise ValueError(f"field {key!r} holds a lone surrogate escape (not Unicode text)")
    if required and not v.strip():
        raise ValueError(f"empty {key!r}")
    return v


def _alpaca(rec: dict) -> list[dict]:
    return [{"instruction": _str(rec, "instruction"), "input": _str(rec, "input", False), "output": _str(rec, "output")}]


def _belle(rec: dict) -> list[dict]:
    if "instances" in rec:
        inst = _str(rec, "instruction")
        items = rec["instances"]
        if not isinstance(items, list) or not items:
            raise ValueError("'instances' must be a non-empty list")
        out = []
        for j, it in enumerate(items):
            if not isinstance(it, dict):
                raise ValueError(f"instance {j} is not an object")
            try:
                out.append({"instruction": inst, "input": _str(it, "input", False), "output": _str(it, "output")})
            except ValueError as e:
                raise ValueError(f"instance {j}: {e}") from None
        return out
    return [{"instruction": _str(rec, "question"), "input": "", "output": _str(rec, "std_answer")}]


def _pclue(rec: dict) -> list[dict]:
    return [{"instruction": _str(rec, "input"), "input": "", "output": _str(rec, "target")}]


def sharegpt_messages(rec: dict) -> list[dict]:
    """A ShareGPT ({conversations: [{from, value}]}) or messages ({messages: [{role, content}]}) record as
    validated [{role, content}] messages; ValueError says which turn is wrong."""
    turns = rec.get("conversations", rec.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of turns")
    msgs, pending = [], False
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"turn {j} is not an object")
        role = t.get("from", t.get("role"))
        value = t.get("value", t.get("content"))
        if not isinstance(role, str) or not isinstance(value, str):
            raise ValueError(f"turn {j}: needs string 'from' and 'value' (or 'role' and 'content')")
        if has_lone_surrogate(value) or has_lone_surrogate(role):
            raise ValueError(f"turn {j}: holds a lone surrogate escape (not Unicode text)")
        role = role.lower()
        if role in _SYSTEM:
            if j != 0:
                raise ValueError(f"turn {j}: a system turn is only allowed first")
            msgs.append({"role": "system", "content": value.strip()})
        elif role in _USER:
            if pending:
                raise ValueError(f"turn {j}: two user turns in a row")
            if not value.strip():
                raise ValueError(f"turn {j}: empty user turn")
            msgs.append({"role": "user", "content": value})
            pending = True
        elif role in _ASSISTANT:
            if not pending:
                raise ValueError(f"turn {j}: assistant turn without a user turn before it")
            if not value.strip():
                raise ValueError(f"turn {j}: empty assistant turn")
            msgs.append({"role": "assistant", "content": value})
            pending = False
        else:
            raise ValueError(f"turn {j}: unknown speaker {role!r}")
    if pending:
        raise ValueError("conversation ends with a user turn (no answer to train on)")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no user/assistant exchange")
    return msgs


def _sharegpt(rec: dict) -> list[dict]:
    msgs = sharegpt_messages(rec)
    if len(msgs) == 2:
        return [{"instruction": msgs[0]["content"], "input": "", "output": msgs[1]["content"]}]
    return [{"messages": msgs}]


_CONVERT = {"alpaca": _alpaca, "belle": _belle, "pclue": _pclue, "sharegpt": _sharegpt}


def convert_records(rows: list, path: Path, fmt: str = "auto") -> tuple[list[dict], list[dict]]:
    """(records, problems); each problem is {file, index, reason}."""
    records, problems = [], []
    for i, rec in enumerate(rows):
        if not isinstance(rec, dict):
            problems.append({"file": str(path), "index": i, "reason": f"not a JSON object ({type(rec).__name__})"})
            continue
        f = detect_format(rec) if fmt == "auto" else fmt
        if f is None:
            problems.append({"file": str(path), "index": i,
                             "reason": f"unknown record shape (fields: {', '.join(sorted(rec)) or 'none'})"})
            continue
        try:
            records.extend(_CONVERT[f](rec))
        except ValueError as e:
            problems.append({"file": str(path), "index": i, "reason": f"{f}: {e}"})
    return records, problems


def convert_files(inputs, out, fmt: str = "auto", strict: bool = False, log=print) -> dict:
    """Convert all inputs into one Alpaca file; writes OUT and OUT.report.json; returns the report."""
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"--format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    all_records, all_problems, per_file = [], [], {}
    for p in map(Path, inputs):
        if p.is_dir():
            raise UserError(f"{p}: is a folder; pass the .json/.jsonl files")
        rows = read_records(p)
        recs, probs = convert_records(rows, p, fmt)
        per_file[str(p)] = {"records_in": len(rows), "records_out": len(recs), "dropped": len(probs)}
        all_records.extend(recs)
        all_problems.extend(probs)
    # group "turn 3: empty user turn" and "turn 5: empty user turn" under one reason
    reasons = Counter(re.sub(r"\b\d+\b", "N", re.sub(r"\(fields: .*\)", "", pr["reason"])).strip()
                      for pr in all_problems)
    report = {"out": str(out), "records": len(all_records), "dropped": len(all_problems),
              "dropped_by_reason": dict(reasons), "files": per_file, "problems": all_problems}
    for pr in all_problems[:10]:
        log(f"dropped {pr['file']} record {pr['index']}: {pr['reason']}")
    if len(all_problems) > 10:
        log(f"... {len(all_problems) - 10} more dropped records, all listed in {out}.report.json")
    if strict and all_problems:
        raise UserError(f"{len(all_problems)} invalid record(s), first: {all_problems[0]['file']} record "
                        f"{all_problems[0]['index']}: {all_problems[0]['reason']}")
    if not all_records:
        raise UserError(f"no valid records in {', '.join(map(str, inputs))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.name.endswith(".jsonl"):
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_records), encoding="utf-8")
    else:
        tmp.write_text(json.dumps(all_records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    write_json(out.with_name(out.name + ".report.json"), report)
    log(f"wrote {len(all_records)} records (Alpaca, or conversations as messages) to {out}; dropped {len(all_problems)}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in reasons.items())})" if reasons else ""))
    return report
