"""The files of a model or tokenizer folder checked before any library loads them, without importing torch.

A truncated, empty or foreign file (or one in another encoding) is one UserError naming it, instead of a traceback from
safetensors, transformers, tokenizers or protobuf; sizes in config.json are checked before anything allocates them.

Public API (also re-exported by zhllama.models):
    read_config(model_dir) -> dict        config.json: UTF-8 JSON of an object, sizes positive integers <= MAX_SIZE
    check_weight_files(model_dir) -> {tensor name: shape}
                                          every safetensors file's header (listed by the index when there is one) read
                                          and checked against the file's size; never a tensor read
    check_tokenizer_files(tok_dir)        tokenizer.json / tokenizer_config.json are JSON objects, tokenizer.model a
                                          SentencePiece model with pieces
    check_model_dir(model_dir) -> dict    all three, for a model folder
"""
from __future__ import annotations

import json
from pathlib import Path

from zhllama.errors import UserError

# config.json fields that size tensors: a string or a huge number there would fail deep inside transformers or try to
# allocate it; 2**24 rows/columns is far beyond any LLaMA-family model
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "head_dim")
MAX_SIZE = 1 << 24


def _json_object(path: Path, what: str) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); {what} must be UTF-8 JSON") from None
    except ValueError as e:
        why = "empty file" if not raw.strip() else f"{e}"
        raise UserError(f"{path}: not valid JSON ({why}); {what} must be a JSON object (truncated or corrupt?)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a JSON {type(obj).__name__}; {what} must be a JSON object")
    return obj


def read_config(model_dir: str | Path) -> dict:
    p = Path(model_dir) / "config.json"
    cfg = _json_object(p, "a model's config.json")
    for sub in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        for k in _SIZE_FIELDS:
            v = sub.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_SIZE):
                raise UserError(f"{p}: {k} is {v!r}; expected a positive integer up to {MAX_SIZE:,}")
    return cfg


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = _json_object(index, "a safetensors index").get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise UserError(f"{index}: no weight_map of tensor name -> file; the index is corrupt")
        files = [model_dir / f for f in sorted(set(wm.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index}: lists {', '.join(missing[:3])}, which {'is' if len(missing) == 1 else 'are'} "
                            "not in the folder (an incomplete download or copy?)")
        return files
    return sorted(model_dir.glob("*.safetensors"))


def check_weight_files(model_dir: str | Path) -> dict:
    """{tensor name: shape} over the folder's safetensors files, every header checked (never a tensor read)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for f in _weight_files(Path(model_dir)):
        try:
            with safe_open(str(f), "numpy") as sf:  # headers only: no torch needed
                for k in sf.keys():
                    shapes[k] = tuple(sf.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{f}: not a complete safetensors file ({why}); it is truncated or corrupt - copy or "
                            "export it again") from None
    return shapes


def _is_tiktoken_ranks(path: Path) -> bool:
    """Meta's Llama-3 tokenizer.model is a tiktoken rank file ('base64 rank' lines), not a SentencePiece model."""
    import re

    with open(path, "rb") as f:
        head = f.read(4096).split(b"\n")[:3]
    lines = [ln for ln in head if ln]
    return bool(lines) and all(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", ln) for ln in lines)


def check_tokenizer_files(tok_dir: str | Path) -> None:
    from sentencepiece import sentencepiece_model_pb2

    tok_dir = Path(tok_dir)
    tj = tok_dir / "tokenizer.json"
    if tj.is_file():
        obj = _json_object(tj, "tokenizer.json")
        if not isinstance(obj.get("model"), dict):
            raise UserError(f"{tj}: no 'model' object; not a Hugging Face tokenizers file")
    tc = tok_dir / "tokenizer_config.json"
    if tc.is_file():
        _json_object(tc, "tokenizer_config.json")
    tm = tok_dir / "tokenizer.model"
    if tm.is_file() and not _is_tiktoken_ranks(tm):
        import sentencepiece as spm

        data = tm.read_bytes()
        m = sentencepiece_model_pb2.ModelProto()
        try:
            m.ParseFromString(data)
            # a truncated file can still parse, with pieces that contradict its trainer spec
            if len(m.pieces):
                spm.SentencePieceProcessor(model_proto=data)
        except Exception:  # protobuf's DecodeError, its C implementation's own types, sentencepiece's checks
            m = None
        if m is None or not len(m.pieces):
            raise UserError(f"{tm}: not a SentencePiece model (truncated, empty or another kind of file)")


def check_model_dir(model_dir: str | Path) -> dict:
    """config.json, the safetensors headers and the tokenizer files of a model folder, before anything is written."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    cfg = read_config(model_dir)
    check_weight_files(model_dir)
    check_tokenizer_files(model_dir)
    return cfg
