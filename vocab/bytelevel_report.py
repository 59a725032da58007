"""Compression report for a byte-level base and its extension, side by side with any other tokenizers
(tokenizer.json folders/files or SentencePiece .model files): the same table, JSON keys and chart as vocab.report.

Public API:
    load_encoder(path) -> Encoder
    build_report(tokenizer, base, texts, compare=None, max_lines=None, english=None) -> dict
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from corpora.probes import ENGLISH, TABLE1
from vocab.spmodel import HAN_RE


@dataclass
class Encoder:
    vocab_size: int
    encode: Callable[[list[str]], list[list[int]]]
    partial: set[int]  # ids that are not whole UTF-8 text (byte fallback pieces / byte fragments)


def load_encoder(path: str | Path) -> Encoder:
    from vocab.bytelevel import is_bytelevel, tokenizer_json_path, to_bytes

    if is_bytelevel(path):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_json_path(path)))
        partial = set()
        for s, i in tok.get_vocab(with_added_tokens=False).items():
            try:
                to_bytes(s).decode("utf-8")
            except (UnicodeDecodeError, KeyError):
                partial.add(i)
        return Encoder(tok.get_vocab_size(with_added_tokens=True),
                       lambda lines: [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)], partial)
    from vocab.spmodel import BYTE, load_model, processor

    m = load_model(path, "tokenizer")
    sp = processor(m)
    return Encoder(len(m.pieces), lambda lines: sp.encode(lines, num_threads=0),
                   {i for i, p in enumerate(m.pieces) if p.type == BYTE})


def _stats(e: Encoder, lines: list[str], enc: list[list[int]]) -> dict:
    tokens = sum(len(x) for x in enc)
    chars = sum(len(s) for s in lines)
    nbyte = sum(1 for x in enc for t in x if t in e.partial)
    return {
        "characters": chars,
        "tokens": tokens,
        "tokens_per_1000_chars": round(1000 * tokens / max(1, chars), 2),
        "chars_per_token": round(chars / max(1, tokens), 4),
        "byte_fallback_rate": round(nbyte / max(1, tokens), 5),
        "unk_rate": 0.0,
    }


def _cjk_coverage(e: Encoder, lines: list[str]) -> dict:
    seen: dict[str, int] = {}
    for s in lines:
        for ch in HAN_RE.findall(s):
            seen[ch] = seen.get(ch, 0) + 1
    chars = list(seen)
    covered = [c for c, ids in zip(chars, e.encode(chars)) if len(ids) == 1]
    occ = sum(seen.values())
    return {"distinct_han_characters": len(seen), "covered_by_single_piece": len(covered),
            "occurrences_covered": round(sum(seen[c] for c in covered) / max(1, occ), 5)}


def build_report(tokenizer, base, texts, compare: dict | None = None, max_lines: int | None = None,
                 english: list[str] | None = None) -> dict:
    from vocab.bytelevel import ByteLevelBase, tokenizer_json_path, unreachable
    from tokenizers import Tokenizer

    from vocab.report import ratios_to_base, read_sample

    per_file, lines = read_sample(texts, max_lines)
    encoders = {"base": load_encoder(base), "extended": load_encoder(tokenizer)}
    for name, p in (compare or {}).items():
        encoders[name] = load_encoder(p)
    encoded = {name: e.encode(lines) for name, e in encoders.items()}
    rows = {name: _stats(e, lines, encoded[name]) for name, e in encoders.items()}
    by_file = ratios_to_base(rows, encoded, per_file)
    b = ByteLevelBase(base)
    ext = Tokenizer.from_file(str(tokenizer_json_path(tokenizer)))
    n_added = ext.get_vocab_size(with_added_tokens=True) - b.next_id
    base_ids_same = all(ext.token_to_id(s) == i for s, i in list(b.vocab.items()) + list(b.specials.items()))
    eng = list(ENGLISH) + list(english or [])
    same_eng = [x.ids != y.ids for x, y in zip(b.tok.encode_batch(eng, add_special_tokens=False),
                                                ext.encode_batch(eng, add_special_tokens=False))]
    return {
        "tokenizer": str(tokenizer),
        "base": str(base),
        "texts": list(per_file),
        "lines": len(lines),
        "vocab_size": {name: e.vocab_size for name, e in encoders.items()},
        "added_pieces": n_added,
        "overlapping_pieces": None,
        "base_prefix_unchanged": base_ids_same,
        "pieces_not_in_base": n_added,
        "tokenizers": rows,
        "by_file": by_file,
        "table1": {"sentence": TABLE1, **{n: len(e.encode([TABLE1])[0]) for n, e in encoders.items()}},
        "cjk_coverage": {n: _cjk_coverage(e, lines) for n, e in encoders.items() if n != "base"},
        # byte-level: a dead new token is one whose own text does not encode to it
        "dead_pieces": {"extended": len(unreachable(ext, b, n_added))},
        "english_lines_changed": {"extended": sum(same_eng)},
        "jieba_boundary_share": {},
    }
