"""The GGUF vocabulary of a byte-level BPE tokenizer.json (Llama-3, Qwen-2.5 and their zhllama extensions).

llama.cpp's `gpt2` tokenizer model takes the byte-level token strings in id order, their types and the merges in
rank order; the pre-tokenizer is a name (`tokenizer.ggml.pre`). llama.cpp's own converter finds that name by
hashing the ids of a test string, which an extended vocabulary changes, so it is written here explicitly, from the
split regex of the tokenizer.json: Meta's (`\\p{N}{1,3}`) is `llama-bpe`, Qwen-2's (`\\p{N}` alone) is `qwen2`.

Public API:
    PRE_NAMES
    pre_tokenizer_name(tokenizer_json: dict) -> str
    read_bytelevel_vocab(model_dir, n_rows) -> ByteLevelVocab
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import UserError

NORMAL, CONTROL, UNUSED = 1, 3, 5  # gguf TokenType
_LLAMA3_SPLIT = r"\p{N}{1,3}"
_QWEN2_SPLIT = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
PRE_NAMES = ("llama-bpe", "qwen2")


@dataclass
class ByteLevelVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool


def _split_regexes(pre) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Split":
        return [pre.get("pattern", {}).get("Regex", "")]
    return [r for p in pre.get("pretokenizers", []) for r in _split_regexes(p)]


def pre_tokenizer_name(tok_json: dict) -> str:
    regs = _split_regexes(tok_json.get("pre_tokenizer"))
    if any(_LLAMA3_SPLIT in r for r in regs):
        return "llama-bpe"
    if any(_QWEN2_SPLIT in r for r in regs):
        return "qwen2"
    raise UserError("tokenizer.json: its pre-tokenizer is neither Llama-3's nor Qwen-2's split regex; llama.cpp "
                    f"would need its own pre-tokenizer name (known: {', '.join(PRE_NAMES)})")


def _adds_bos(tok_json: dict, bos: str | None) -> bool:
    """Whether the post-processor puts BOS in front (Llama-3 does, Qwen-2.5 does not)."""
    text = json.dumps(tok_json.get("post_processor") or {})
    return bool(bos) and "TemplateProcessing" in text and f'"SpecialToken": {{"id": {json.dumps(bos)}' in text


def read_bytelevel_vocab(model_dir: str | Path, n_rows: int) -> ByteLevelVocab:
    model_dir = Path(model_dir)
    p = model_dir / "tokenizer.json"
    tok_json = json.loads(p.read_text(encoding="utf-8"))
    cfg_p = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_p.read_text(encoding="utf-8")) if cfg_p.is_file() else {}
    vocab = dict(tok_json["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in tok_json.get("added_tokens") or []}
    vocab.update(specials)
    n = max(vocab.values()) + 1
    if n > n_rows:
        raise UserError(f"{p} has ids up to {n - 1:,} but the model only {n_rows:,} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    types = [UNUSED] * n_rows
    for s, i in vocab.items():
        tokens[i] = s
        types[i] = CONTROL if s in specials else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]

    def tok_id(key):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if v else None

    bos = cfg.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    return ByteLevelVocab(tokens, types, merges, pre_tokenizer_name(tok_json), tok_id("bos_token"),
                          tok_id("eos_token"), tok_id("pad_token"), _adds_bos(tok_json, bos))


def write_vocab(w, v: ByteLevelVocab) -> None:
    """The tokenizer keys of a GGUFWriter for this vocabulary."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    if v.bos_id is not None:
        w.add_bos_token_id(v.bos_id)
    if v.eos_id is not None:
        w.add_eos_token_id(v.eos_id)
    if v.pad_id is not None:
        w.add_pad_token_id(v.pad_id)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(False)
