"""The Llama-3 base tokenizer on a fresh machine: Meta's tiktoken rank file from the PyPI wheel `llama-models`,
converted to a Hugging Face tokenizer.json folder (the byte-level base `vocab build` extends).

The conversion is the one transformers' TikTokenConverter does, without needing `tiktoken`: every token of rank r
becomes vocabulary id r, and every split of it into two tokens a merge ranked by r (then by the parts' ranks), so
HF's lowest-rank-first BPE picks the merges tiktoken picks. The pre-tokenizer is Meta's split regex then ByteLevel;
the 256 specials follow at 128,000 in Meta's order (llama_models/llama3/tokenizer.py), and BOS is added.

Public API:
    LLAMA_MODELS, RANK_PATH, RANK_SHA256
    read_ranks(path) -> {bytes: rank}
    convert(rank_file, out_dir) -> Path (out_dir/tokenizer.json)
    fetch(root=None) -> Path        root/llama3/ with tokenizer.json, tokenizer_config.json, tokenizer.model
"""
from __future__ import annotations

import base64
import json
import zipfile
from pathlib import Path

from zhllama.errors import UserError
from zhllama.hashing import sha256_bytes, sha256_file

LLAMA_MODELS = "llama-models==0.3.0"
RANK_PATH = "llama_models/llama3/tokenizer.model"
RANK_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"  # that wheel's file
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
          "<|eot_id|>", "<|python_tag|>", "<|image|>"]
SPECIALS = _NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_NAMED))]


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """tiktoken's format: one `base64(token) rank` per line."""
    ranks = {}
    p = Path(path)
    try:
        for n, line in enumerate(p.read_text(encoding="ascii").splitlines(), 1):
            if not line:
                continue
            tok, rank = line.split(" ")
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: line {n}: not a tiktoken rank file (expected 'BASE64 RANK' per line): {e}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{p}: the ranks are not 0..{len(ranks) - 1}; not a tiktoken rank file")
    return ranks


def convert(rank_file: str | Path, out_dir: str | Path) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from vocab.bytelevel import to_token

    ranks = read_ranks(rank_file)
    vocab = {to_token(b): r for b, r in ranks.items()}
    merges = []
    for b, r in ranks.items():
        local = [(b[:k], b[k:]) for k in range(1, len(b)) if b[:k] in ranks and b[k:] in ranks]
        local.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((r, to_token(x), to_token(y)) for x, y in local)
    merges.sort(key=lambda m: m[0])  # stable: a token's own splits keep their order
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(x, y) for _, x, y in merges], ignore_merges=True,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    bos = SPECIALS[0]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    if tok.token_to_id(bos) != len(ranks):
        raise UserError(f"{rank_file}: {len(ranks):,} ranks; the specials would not start at {len(ranks):,}")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, len(ranks))])])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(out / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|end_of_text|>",
           "model_max_length": 131072, "clean_up_tokenization_spaces": True,
           "model_input_names": ["input_ids", "attention_mask"]}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return out / "tokenizer.json"


def fetch(root: str | Path | None = None) -> Path:
    """root/llama3/: Meta's rank file from the `llama-models` wheel (pip download, cached) and its tokenizer.json."""
    from zhllama.pypi_files import default_dir, pip_download

    root = Path(root or default_dir())
    out = root / "llama3"
    rank = out / "tokenizer.model"
    if not (rank.is_file() and sha256_file(rank) == RANK_SHA256):
        whl = pip_download(LLAMA_MODELS, root / "downloads")
        try:
            with zipfile.ZipFile(whl) as z:
                data = z.read(RANK_PATH)
        except (zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"{whl}: no {RANK_PATH} in it ({e}); delete it and retry") from None
        if sha256_bytes(data) != RANK_SHA256:
            raise UserError(f"{whl}: {RANK_PATH} has an unexpected sha256; delete {whl} and retry")
        out.mkdir(parents=True, exist_ok=True)
        tmp = rank.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(rank)
    if not (out / "tokenizer.json").is_file():
        convert(rank, out)
    return out
