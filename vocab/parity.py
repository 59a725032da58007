"""Does the Hugging Face tokenizer.json give exactly the ids sentencepiece gives? Line by line."""
from __future__ import annotations

from pathlib import Path

from vocab.spmodel import ModelProto, processor
from zhllama.errors import UserError


def hf_tokenizer(folder: str | Path):
    from tokenizers import Tokenizer

    from zhllama.models import check_tokenizer_files

    check_tokenizer_files(folder)  # a truncated or foreign tokenizer.json is named, not a Rust parse error
    try:
        return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot build a tokenizer from
        raise UserError(f"{Path(folder) / 'tokenizer.json'}: not a tokenizer the tokenizers library can load "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def disagreements(m: "ModelProto", tok, lines: list[str], limit: int = 5) -> tuple[int, list[dict]]:
    """Count lines where sentencepiece and the HF tokenizer differ; return a few examples."""
    sp = processor(m)
    sp_ids = sp.encode(lines, num_threads=0)
    hf_ids = [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]
    bad, examples = 0, []
    for line, a, b in zip(lines, sp_ids, hf_ids):
        if a != b:
            bad += 1
            if len(examples) < limit:
                examples.append({"text": line[:200], "sentencepiece": a[:40], "hf": b[:40]})
    return bad, examples


def english_changed(base: "ModelProto", extended: "ModelProto", lines: list[str]) -> int:
    """Lines whose ids under the extended tokenizer differ from the base tokenizer's."""
    a = processor(base).encode(lines, num_threads=0)
    b = processor(extended).encode(lines, num_threads=0)
    return sum(x != y for x, y in zip(a, b))
