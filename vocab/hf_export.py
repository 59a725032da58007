"""Write a Hugging Face tokenizer folder whose tokenizer.json encodes exactly like the SentencePiece model.

transformers' converter orders BPE merges by vocabulary index and ignores scores, while sentencepiece
(and llama.cpp) merge the adjacent pair whose concatenation has the highest score. We therefore build
tokenizer.json ourselves: every binary split of every piece is a merge, ranked by the score of the
piece it forms, and the normalizer reproduces sentencepiece's dummy prefix and space escaping.
"""
from __future__ import annotations

import json
from pathlib import Path

from vocab.spmodel import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, ModelProto, save_model
from zhllama.errors import UserError


def _merges(m: "ModelProto") -> list[tuple[str, str]]:
    vocab = {p.piece: i for i, p in enumerate(m.pieces) if p.type == NORMAL}
    ranked = []
    for i, p in enumerate(m.pieces):
        if p.type != NORMAL or len(p.piece) < 2:
            continue
        s = p.piece
        for k in range(1, len(s)):
            left, right = s[:k], s[k:]
            if left in vocab and right in vocab:
                # sentencepiece prefers the higher score; equal scores cannot be ordered by rank the
                # way sentencepiece orders them (leftmost first), which is why the improved merge
                # gives every new piece its own score.
                ranked.append((-p.score, i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def tokenizer_json(m: "ModelProto", pad_piece: str | None = None) -> dict:
    ns = m.normalizer_spec
    if ns.name not in ("identity", "") and ns.precompiled_charsmap:
        raise UserError(
            f"tokenizer normalizer {ns.name!r} is not supported by the exact HF export; "
            "LLaMA-layout tokenizers use the identity normalizer"
        )
    if ns.remove_extra_whitespaces:
        raise UserError("tokenizer has remove_extra_whitespaces=true; LLaMA-layout tokenizers keep whitespace as is")
    vocab = {}
    for i, p in enumerate(m.pieces):
        vocab.setdefault(p.piece, i)
    added = []
    for i, p in enumerate(m.pieces):
        special = p.type in (CONTROL, UNKNOWN) or p.piece == pad_piece
        if special or p.type == USER_DEFINED:
            added.append(
                {"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": not special, "special": special}
            )
    unk = m.pieces[m.trainer_spec.unk_id].piece
    bos_id = m.trainer_spec.bos_id
    bos = m.pieces[bos_id].piece
    normalizers = []
    if ns.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "▁"})
    if ns.escape_whitespaces:
        normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    decoders = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if ns.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(x) for x in _merges(m)],
        },
    }


def save_tokenizer_folder(m: "ModelProto", out_dir: str | Path, pad_piece: str | None = None, extra: dict | None = None) -> Path:
    """Write tokenizer.model + tokenizer.json + tokenizer_config.json (+ special_tokens_map.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(m, out / "tokenizer.model")
    tj = tokenizer_json(m, pad_piece=pad_piece)
    tmp = out / "tokenizer.json.tmp"
    tmp.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    tmp.replace(out / "tokenizer.json")
    ts = m.trainer_spec
    cfg = {
        # Loads tokenizer.json exactly as written (TokenizersBackend in transformers v5, the fast
        # tokenizer in v4); LlamaTokenizer would rebuild normalizer/pre-tokenizer from its defaults.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "backend": "tokenizers",
        "bos_token": m.pieces[ts.bos_id].piece,
        "eos_token": m.pieces[ts.eos_id].piece,
        "unk_token": m.pieces[ts.unk_id].piece,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "padding_side": "right",
    }
    if pad_piece:
        cfg["pad_token"] = pad_piece
    if extra:
        cfg.update(extra)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    smap = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in cfg}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n", encoding="utf-8")
    return out
