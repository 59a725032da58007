"""Show what training will see: rendered prompts, their tokens, and which tokens carry loss."""
from __future__ import annotations

import json

from sft.data import IGNORE_INDEX, ExampleEncoder, load_records


def preview(data, tokenizer_dir, template: str | None = None, n: int = 3, as_json: bool = False,
            max_length: int = 512, reference: bool = False, out=print) -> list[dict]:
    from zhllama.chat import get
    from zhllama.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    enc = ExampleEncoder(tok, get(template), max_length=max_length, reference=reference)
    records = load_records(data, drop_invalid=False, log=lambda *_: None)[:n]
    rows = []
    for rec in records:
        e = enc.encode(rec)
        rows.append({"source": rec.source, "prompt": e.prompt, "target": e.target + tok.eos_token,
                     "input_ids": e.input_ids, "labels": e.labels, "truncated": e.truncated})
    if as_json:
        out(json.dumps([{k: r[k] for k in ("prompt", "target", "input_ids", "labels")} for r in rows],
                       ensure_ascii=False, indent=1))
        return rows
    for r in rows:
        pieces = tok.convert_ids_to_tokens(r["input_ids"])
        n_train = sum(1 for x in r["labels"] if x != IGNORE_INDEX)
        out(f"=== {r['source']}  template={get(template).name}  tokens={len(pieces)}  trained={n_train}"
            + ("  TRUNCATED" if r["truncated"] else ""))
        out("--- prompt (masked, labels -100) ---")
        out(r["prompt"] + "⟧")
        out("--- target (trained) ---")
        out(r["target"])
        out("--- tokens: [id piece] masked, <id piece> trained ---")
        cells = [(f"<{i} {p}>" if lab != IGNORE_INDEX else f"[{i} {p}]")
                 for i, p, lab in zip(r["input_ids"], pieces, r["labels"])]
        out(" ".join(cells))
        out("")
    return rows
