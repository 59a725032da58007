"""The SFT tokenizer (pretrain's tokenizer + [PAD] when it has no pad) and the vocabulary-size checks.

Chinese-Alpaca's 49,954 tokenizer is Chinese-LLaMA's 49,953 plus one pad piece. The pad is appended
as a CONTROL piece through vocab.merge (never produced from text, decodes to nothing), so every other
piece keeps its id and the model only grows by one row at the end.
"""
from __future__ import annotations

from pathlib import Path

from zhllama.errors import UserError


# Llama-3's reserved pad special: a pad that needs no new row
LLAMA3_PAD = "<|finetune_right_pad_id|>"


def prepare_tokenizer(src_dir, out_dir, log=print, eos: str | None = None):
    """Copy the tokenizer from src_dir to out_dir, adding [PAD] if it has none; returns (tokenizer, added).

    eos: the template's end-of-turn token (Llama-3: <|eot_id|>) becomes the tokenizer's eos_token, so every consumer
    of the SFT tokenizer (training targets, generate, the server, the GGUF) ends answers with it."""
    from transformers import AutoTokenizer

    from zhllama.models import load_tokenizer

    src, out = Path(src_dir), Path(out_dir)
    tok = load_tokenizer(src)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tok.get_vocab()
    if eos and tok.eos_token != eos:
        if eos not in vocab:
            raise UserError(f"{src}: the template ends turns with {eos}, which this tokenizer does not have; "
                            "use a template made for this model (e.g. chatml or chinese-alpaca)")
        tok.eos_token = eos
    if tok.pad_token_id is None and LLAMA3_PAD in vocab:
        tok.pad_token = LLAMA3_PAD
    if tok.pad_token_id is not None:
        tok.save_pretrained(str(out))
        if (src / "tokenizer.model").is_file():
            import shutil

            shutil.copy2(src / "tokenizer.model", out / "tokenizer.model")
        return AutoTokenizer.from_pretrained(str(out)), False
    if (src / "tokenizer.model").is_file():
        from vocab.hf_export import save_tokenizer_folder
        from vocab.merge import PAD_PIECE, append_pad
        from vocab.spmodel import load_model

        m = load_model(src / "tokenizer.model")
        if len(m.pieces) != len(tok):
            raise UserError(f"{src}: tokenizer.model has {len(m.pieces):,} pieces but tokenizer.json {len(tok):,}; "
                            "the folder mixes two tokenizers")
        append_pad(m, score=0.0, control=True)
        save_tokenizer_folder(m, out, pad_piece=PAD_PIECE)
    else:
        # no SentencePiece model to extend: add the pad as a special token to the HF tokenizer
        tok.add_special_tokens({"pad_token": "[PAD]"})
        tok.save_pretrained(str(out))
    new = AutoTokenizer.from_pretrained(str(out))
    log(f"tokenizer: added [PAD] as id {new.pad_token_id} ({len(tok):,} -> {len(new):,} pieces)")
    return new, True


def check_vocab(model_rows: int, tokenizer_len: int, pad_added: bool, model_dir, tok_dir) -> None:
    """Fail before training on a tokenizer/model mismatch, the 49,953 vs 49,954 classic."""
    expected = tokenizer_len - (1 if pad_added else 0)
    if model_rows == tokenizer_len:
        return
    if pad_added and model_rows == expected:
        return  # the model grows by the pad row
    hint = ""
    if abs(model_rows - tokenizer_len) == 1:
        hint = " (the 49,953 vs 49,954 mix-up: use the tokenizer the model was trained with)"
    elif model_rows % 64 == 0 and model_rows > tokenizer_len:
        hint = " (was the model's vocabulary padded to a multiple of 64 without the tokenizer?)"
    raise UserError(f"model {model_dir} has {model_rows:,} embedding rows but tokenizer {tok_dir} has "
                    f"{tokenizer_len - (1 if pad_added else 0):,} pieces{hint}")
