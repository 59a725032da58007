"""Resize a causal LM to a byte-level BPE extension (vocab build over a tokenizer.json base) and initialise new rows.

A new token's base encoding is the leaves of its merge tree: the extended tokenizer encodes text as the base does,
then applies the appended merges (vocab.bytelevel), so expanding each appended merge down to base ids gives exactly
the ids the base tokenizer makes of the token's text. No base tokenizer is needed to initialise the rows.

The model may have more rows than its tokenizer has ids (Qwen-2.5 pads 151,665 ids to 151,936 rows): the new
tokens take the ids after the tokenizer's last one, so they reuse those untrained padding rows first, and the
matrices grow only past them.

Public API:
    first_new_id(tokenizer_dir, model_dir) -> int
    merge_sources(tokenizer_json: dict, first_new: int) -> list[list[int]]    base ids of each new token, in id order
    resize_bytelevel(model_dir, tokenizer_dir, out_dir, init="subword-mean", seed=0) -> dict (summary)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from zhllama.errors import UserError
from zhllama.models import INITS, check_sizes, copy_tokenizer, init_new_rows, load_model_dir, tokenizer_len


def _load_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: cannot be read as JSON ({e})") from None


def first_new_id(tokenizer_dir: Path, model_dir: Path) -> int:
    """Where the appended ids start: the base size `vocab build` recorded, checked against the model's own
    tokenizer.json when its folder has one (the extension must keep every one of its ids)."""
    rep = tokenizer_dir / "build_report.json"
    first = _load_json(rep).get("first_new_id") if rep.is_file() else None
    own = model_dir / "tokenizer.json"
    if own.is_file() and not (model_dir / "tokenizer.model").is_file():
        base = _load_json(own)
        ext_vocab = _load_json(tokenizer_dir / "tokenizer.json")["model"]["vocab"]
        ids = list(base["model"]["vocab"].items()) + [(t["content"], t["id"]) for t in base.get("added_tokens") or []]
        bad = next(((s, i) for s, i in ids if ext_vocab.get(s) != i), None)
        if bad is not None:
            raise UserError(f"{tokenizer_dir} is not an extension of the model's tokenizer {own}: {bad[0]!r} is id {bad[1]} "
                            f"there; build it with `python -m vocab build --base {own}`")
        own_next = max(i for _, i in ids) + 1
        if first is not None and first != own_next:
            raise UserError(f"{rep}: first_new_id {first} but the model's tokenizer {own} ends at id {own_next - 1}")
        first = own_next
    if first is None:
        raise UserError(f"{tokenizer_dir}: no build_report.json (written by `python -m vocab build`) and no tokenizer.json "
                        f"in {model_dir}: cannot tell where the new tokens start")
    return int(first)


def merge_sources(tok_json: dict, first_new: int) -> list[list[int]]:
    vocab = tok_json["model"]["vocab"]
    pair: dict[int, tuple[int, int]] = {}
    for m in tok_json["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        r = vocab.get(a + b)
        if r is not None and r >= first_new:
            pair[r] = (vocab[a], vocab[b])
    n = max(vocab.values()) + 1 - first_new
    memo: dict[int, list[int]] = {}

    def expand(i: int) -> list[int]:
        if i < first_new:
            return [i]
        if i not in memo:
            if i not in pair:
                raise UserError(f"token id {i} ({[k for k, v in vocab.items() if v == i][:1]}) has no merge: "
                                "not a tokenizer written by `python -m vocab build`")
            a, b = pair[i]
            memo[i] = expand(a) + expand(b)  # merges only build on lower ids, so this ends
        return memo[i]

    return [expand(first_new + k) for k in range(n)]


def resize_bytelevel(model_dir, tokenizer_dir, out_dir, init: str = "subword-mean", seed: int = 0) -> dict:
    from zhllama import runfolder
    from zhllama.runfolder import ensure_writable

    model_dir, tokenizer_dir, out_dir = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    if init not in INITS:
        raise UserError(f"--init {init!r}: choose one of {', '.join(INITS)}")
    tok_len = tokenizer_len(tokenizer_dir)
    first = first_new_id(tokenizer_dir, model_dir)
    tok_json = _load_json(tokenizer_dir / "tokenizer.json")
    ensure_writable(out_dir)
    with runfolder.lock(out_dir):
        inputs = {"model": runfolder.input_entry(model_dir),
                  "tokenizer": runfolder.input_entry(tokenizer_dir / "tokenizer.json")}
        fingerprint = {"inputs": inputs, "init": init, "seed": seed}
        if runfolder.decide(out_dir, fingerprint, "auto", artefacts=("config.json",)) == "up-to-date":
            print(f"{out_dir} is up to date with its inputs; nothing to do")
            return runfolder.read_result(out_dir)
        runfolder.begin(out_dir, {"stage": "pretrain.resize", "init": init, "seed": seed}, fingerprint)
        model = load_model_dir(model_dir, dtype="auto")
        check_sizes(model, model_dir)
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < first:
            raise UserError(f"{model_dir} has {rows:,} rows but its tokenizer's ids go up to {first - 1:,}")
        n_new = tok_len - first
        sources = merge_sources(tok_json, first) if init == "subword-mean" else None
        new_size = max(rows, tok_len)
        model.resize_token_embeddings(new_size, mean_resizing=False)  # STACK.md trap 7: the rows are set below
        model.config.vocab_size = new_size
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().vocab_size = new_size
        init_new_rows(model, first, n_new, init, sources, seed)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if tied:
            model.tie_weights()
        summary = {"old_vocab": first, "old_rows": rows, "new_vocab": new_size, "added": n_new, "init": init,
                   "seed": seed, "tied": tied, "empty_sources": 0, "tokenizer": "bytelevel"}
        stage = runfolder.staging(out_dir)
        if new_size == tok_len:
            check_sizes(model, out_dir, tok_len, tokenizer_dir)
        model.save_pretrained(stage)
        copy_tokenizer(tokenizer_dir, stage)
        if sources is not None:
            from zhllama.manifest import write_json

            write_json(stage / "init_sources.json", {str(first + k): s for k, s in enumerate(sources)})
        parents = [runfolder.parent_entry(model_dir), runfolder.parent_entry(tokenizer_dir)]
        runfolder.finish(out_dir, "pretrain.resize", summary, inputs, parents, seed=seed, fingerprint=fingerprint,
                         config={"stage": "pretrain.resize", **summary})
        return summary
