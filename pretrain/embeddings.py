"""Resize a causal LM to an extended tokenizer and initialise the new rows.

The generic helpers (load, check sizes, resize, copy the tokenizer) are in zhllama.models.

Public API:
    base_processor(model_dir, ext_proto, old_vocab) -> sentencepiece processor of the BASE tokenizer
    subword_sources(base_sp, pieces) -> list[list[int]]       old ids whose mean initialises each new piece
    resize_folder(model_dir, tokenizer_dir, out_dir, init="subword-mean", seed=0) -> dict (summary)
"""
from __future__ import annotations

from pathlib import Path



from zhllama.errors import UserError
from zhllama.models import (
    INITS, check_model_dir, check_sizes, check_tokenizer_files, copy_tokenizer, load_model_dir, resize_model, tokenizer_len,
)
from zhllama.runfolder import ensure_writable

def _piece_list(proto) -> list[str]:
    return [p.piece for p in proto.pieces]


def _model_vocab(model_dir: Path) -> tuple[list[str] | None, str]:
    """The model's own tokenizer pieces in id order, if its folder carries a tokenizer."""
    if (model_dir / "tokenizer.model").is_file():
        from vocab.spmodel import load_model

        return _piece_list(load_model(model_dir / "tokenizer.model")), str(model_dir / "tokenizer.model")
    if (model_dir / "tokenizer.json").is_file():
        from zhllama.models import load_tokenizer

        tok = load_tokenizer(model_dir)
        inv = {i: t for t, i in tok.get_vocab().items()}
        return [inv.get(i, "") for i in range(len(inv))], str(model_dir / "tokenizer.json")
    return None, ""


def base_processor(model_dir: Path, ext, old_vocab: int, tok_dir: Path):
    """The base tokenizer = the model's own tokenizer; the extension must keep its first pieces unchanged."""
    from vocab.spmodel import ModelProto, load_model, processor

    pieces, where = _model_vocab(model_dir)
    ext_pieces = _piece_list(ext)
    if pieces is not None:
        if len(pieces) != old_vocab:
            raise UserError(f"{where} has {len(pieces):,} pieces but the model in {model_dir} has {old_vocab:,} rows; fix the model folder's tokenizer")
        bad = next((i for i, (a, b) in enumerate(zip(pieces, ext_pieces)) if a != b), None)
        if bad is not None:
            raise UserError(
                f"{tok_dir} is not an extension of the model's tokenizer {where}: id {bad} is {ext_pieces[bad]!r} there and "
                f"{pieces[bad]!r} in the model's; build it with `python -m vocab build --base {where}` so old ids keep their meaning"
            )
    if (model_dir / "tokenizer.model").is_file():
        base = load_model(model_dir / "tokenizer.model")
    else:
        # The extension appends pieces and keeps every old score, so its first old_vocab pieces are the base.
        base = ModelProto()
        base.CopyFrom(ext)
        del base.pieces[old_vocab:]
    # Encode each new piece as a fragment in the middle of text: no dummy "▁" added, whitespace kept.
    base.normalizer_spec.add_dummy_prefix = False
    base.normalizer_spec.remove_extra_whitespaces = False
    return processor(base)


def subword_sources(base_sp, pieces: list[str]) -> list[list[int]]:
    """Old-vocabulary ids the base tokenizer splits each piece's text into (byte-fallback pieces included)."""
    out = []
    for piece in pieces:
        m = piece.replace("\u2581", " ")
        ids = base_sp.encode(m) if m else []
        # a leading space must map to a "▁"-prefixed piece, not be dropped or become a lone "▁" row
        out.append([i for i in ids if 0 <= i < base_sp.get_piece_size()])
    return out


def resize_folder(model_dir, tokenizer_dir, out_dir, init: str = "subword-mean", seed: int = 0) -> dict:
    from vocab.spmodel import load_model
    from zhllama import runfolder

    model_dir, tokenizer_dir, out_dir = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    if init not in INITS:
        raise UserError(f"--init {init!r}: choose one of {', '.join(INITS)}")
    check_model_dir(model_dir)  # a corrupt input is named before the output folder is touched
    check_tokenizer_files(tokenizer_dir)
    from vocab.bytelevel import is_bytelevel

    if is_bytelevel(tokenizer_dir):  # a tokenizer.json extension of a byte-level base (Llama-3, Qwen-2.5)
        from pretrain.embeddings_bytelevel import resize_bytelevel

        return resize_bytelevel(model_dir, tokenizer_dir, out_dir, init=init, seed=seed)
    new_size = tokenizer_len(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise UserError(f"{tokenizer_dir}: no tokenizer.model; the extended tokenizer folder from `python -m vocab build` has one")
    ext = load_model(tokenizer_dir / "tokenizer.model")
    if len(ext.pieces) != new_size:
        raise UserError(f"{tokenizer_dir}: tokenizer.model has {len(ext.pieces):,} pieces but tokenizer.json {new_size:,}; rebuild the folder")
    ensure_writable(out_dir)
    with runfolder.lock(out_dir):
        inputs = {"model": runfolder.input_entry(model_dir), "tokenizer": runfolder.input_entry(tokenizer_dir / "tokenizer.model")}
        fingerprint = {"inputs": inputs, "init": init, "seed": seed}
        if runfolder.decide(out_dir, fingerprint, "auto", artefacts=("config.json",)) == "up-to-date":
            print(f"{out_dir} is up to date with its inputs; nothing to do")
            return runfolder.read_result(out_dir)
        # a full disk: one line naming OUT; lock() removes the staged part and puts the previous result back
        with runfolder.writing(out_dir):
            stage = runfolder.staging(out_dir)  # first: from here on a failure puts the previous result back
            runfolder.begin(out_dir, {"stage": "pretrain.resize", "init": init, "seed": seed}, fingerprint)
            summary, sources, new_pieces, model = _resize(model_dir, tokenizer_dir, ext, new_size, init, seed)
            check_sizes(model, out_dir, new_size, tokenizer_dir)
            model.save_pretrained(stage)
            copy_tokenizer(tokenizer_dir, stage)
            if sources is not None:
                from zhllama.manifest import write_json

                write_json(stage / "init_sources.json", {p: s for p, s in zip(new_pieces, sources)})
            parents = [runfolder.parent_entry(model_dir), runfolder.parent_entry(tokenizer_dir)]
            runfolder.finish(out_dir, "pretrain.resize", summary, inputs, parents, seed=seed, fingerprint=fingerprint,
                             config={"stage": "pretrain.resize", **summary})
        return summary


def _resize(model_dir: Path, tokenizer_dir: Path, ext, new_size: int, init: str, seed: int):
    # the stored dtype is kept (a bf16/fp16 7B stays 13.5 GB instead of becoming 27 GB of fp32); new rows are
    # averaged in fp32 by resize_model
    model = load_model_dir(model_dir, dtype="auto")
    check_sizes(model, model_dir)
    old = model.get_input_embeddings().weight.shape[0]
    if new_size < old:
        raise UserError(
            f"{tokenizer_dir} has {new_size:,} tokens but {model_dir} already has {old:,} rows: pass the extended tokenizer "
            "(a superset of the model's vocabulary), not a smaller one"
        )
    sp = base_processor(model_dir, ext, old, tokenizer_dir)
    new_pieces = [p.piece for p in ext.pieces[old:]]
    sources = subword_sources(sp, new_pieces) if init == "subword-mean" else None
    resize_model(model, new_size, init, sources, seed=seed)
    summary = {"old_vocab": old, "new_vocab": new_size, "added": new_size - old, "init": init, "seed": seed,
               "tied": bool(getattr(model.config, "tie_word_embeddings", False)),
               "empty_sources": sum(1 for s in (sources or []) if not s)}
    return summary, sources, new_pieces, model
