"""Load, validate and serialise SentencePiece ModelProto files."""
from __future__ import annotations

import os
import re
from pathlib import Path

from zhllama.errors import UserError


def _import_pb2():
    # Older protobuf C++ backends refuse sentencepiece's generated module ("Descriptors cannot be
    # created directly"); the pure-python backend always works, so fall back to it.
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb2
    except TypeError:
        os.environ["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
        import importlib
        import sys

        for mod in [m for m in sys.modules if m.startswith("google.protobuf")]:
            del sys.modules[mod]
        pb2 = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    return pb2


pb2 = _import_pb2()
ModelProto = pb2.ModelProto
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE, UNIGRAM = 2, 1

# Han ideographs (incl. extensions and compatibility), CJK punctuation, full-width forms, kana, bopomofo.
CJK_CHARS = (
    "\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u31a0-\u31bf\u3400-\u4dbf\u4e00-\u9fff"
    "\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003134f"
)
CJK_RE = re.compile(f"[{CJK_CHARS}]")
HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def load_model(path: str | Path, what: str = "model") -> "ModelProto":
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        else:
            raise UserError(f"{path}: folder has no tokenizer.model ({what} must be a SentencePiece .model file)")
    if not path.is_file():
        raise UserError(f"{path}: no such file ({what} must be a SentencePiece .model file)")
    data = path.read_bytes()
    m = ModelProto()
    try:
        m.ParseFromString(data)
    except Exception:
        raise UserError(f"{path}: not a SentencePiece model (protobuf parse failed); expected a tokenizer.model file") from None
    if len(m.pieces) == 0:
        raise UserError(f"{path}: not a SentencePiece model (no pieces); expected a tokenizer.model file")
    # a truncated file can still parse as a protobuf whose pieces contradict its trainer spec
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:
        raise UserError(f"{path}: not a usable SentencePiece model ({str(e).splitlines()[0][:200]}); expected an "
                        "intact tokenizer.model file (truncated or damaged?)") from None
    return m


def check_llama_layout(m: "ModelProto", path: str | Path) -> None:
    """The merge and the HF export assume LLaMA's layout: BPE with byte fallback."""
    if m.trainer_spec.model_type != BPE:
        raise UserError(
            f"{path}: base tokenizer is {pb2.TrainerSpec.ModelType.Name(m.trainer_spec.model_type)}, "
            "expected BPE with byte_fallback (a LLaMA/Mistral-style tokenizer.model)"
        )
    if not m.trainer_spec.byte_fallback or sum(p.type == BYTE for p in m.pieces) != 256:
        raise UserError(f"{path}: base tokenizer has no byte fallback (256 <0xXX> pieces); expected a LLaMA-style tokenizer.model")


def save_model(m: "ModelProto", path: str | Path) -> bytes:
    data = m.SerializeToString()
    Path(path).write_bytes(data)
    return data


def processor(m: "ModelProto"):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def without_dummy_prefix(m: "ModelProto") -> "ModelProto":
    """A copy that encodes a string exactly as a fragment in the middle of a text (no leading "▁" added)."""
    c = ModelProto()
    c.CopyFrom(m)
    c.normalizer_spec.add_dummy_prefix = False
    return c


def lowest_score(m: "ModelProto") -> float:
    return min(p.score for p in m.pieces if p.type in (NORMAL, USER_DEFINED))


def descending_scores(start_below: float, n: int) -> list[float]:
    """n strictly decreasing float32 scores, all below `start_below`.

    Scores are stored as float32; near LLaMA's -1e9 whitespace scores consecutive integers collapse,
    so the step grows with the float32 spacing. Unique scores are what make the HF merge order and
    sentencepiece agree.
    """
    import numpy as np

    out = []
    cur = np.float32(start_below)
    for _ in range(n):
        nxt = np.nextafter(cur, np.float32(-np.inf), dtype=np.float32)
        # round down to an integer-ish value when possible so the model stays readable
        cand = np.float32(np.floor(float(cur) - 1.0))
        cur = cand if cand < cur else nxt
        out.append(float(cur))
    return out
