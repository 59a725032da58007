"""Hugging Face model folders shared by every stage: load, check sizes, resize, copy the tokenizer beside a model.

Public API:
    load_model_dir(model_dir, dtype=torch.float32) -> model     UserError (one line) on a folder that cannot load,
                                                                  checked against the safetensors headers first
    check_sizes(model, model_dir, tok_len=None, tok_dir=None)     config.vocab_size == embedding rows == LM-head rows
                                                                  (== len(tokenizer) when given), else UserError
    tokenizer_len(tok_dir) -> int                                 len(AutoTokenizer) of a tokenizer folder
    (from zhllama.modelfiles, torch-free:)
    read_config(model_dir) -> dict                                config.json, UserError (one line naming it) when it
                                                                  is not UTF-8 JSON of an object with sane sizes
    check_weight_files(model_dir) -> {tensor name: shape}         every safetensors file's header read and checked
                                                                  against its size (truncated, empty, not safetensors)
    check_tokenizer_files(tok_dir)                                tokenizer.json / tokenizer_config.json parse as JSON
                                                                  objects and tokenizer.model as SentencePiece, else
                                                                  UserError naming the file
    check_model_dir(model_dir) -> dict                            read_config + check_weight_files +
                                                                  check_tokenizer_files
    load_tokenizer(tok_dir) -> tokenizer                          AutoTokenizer after check_tokenizer_files; any other
                                                                  failure is a UserError naming the folder
    copy_tokenizer(tok_dir, out_dir)                              the tokenizer files (TOKENIZER_FILES) that exist
    resize_model(model, new_size, init, sources=None, seed=0)    grow embed/head in place; old rows bit-identical;
                                                                  init in INITS ("subword-mean" needs sources)
    checkpoint_vocab_rows(model_dir) -> {tensor name: rows}       from safetensors headers, no weights read
    lora_tying(model, targets, modules_to_save) -> dict           LoraConfig kwargs that keep a tied embedding/LM head
                                                                  tied in the adapter (peft's ensure_weight_tying)
    load_peft_chain(base, adapters, dtype=None) -> PeftModel      base + adapters as peft does it: earlier ones merged,
                                                                  the last one live; embeddings resized to the adapters'
    load_adapter_chain(base, adapters, dtype=None, log=print, merge=False) -> (model, Chain)
        the one loader of a base + adapter chain (sft generate/chat/train, evaluation): the chain is checked against
        the adapters' lineage records (zhllama.lineage.resolve_chain; one adapter brings its parents and base) and
        loaded; merge=True merges every adapter (plain forward passes)
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from zhllama.errors import UserError
from zhllama.modelfiles import (  # noqa: F401 - part of this module's public API
    MAX_SIZE, check_model_dir, check_tokenizer_files, check_weight_files, read_config,
)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INITS = ("subword-mean", "mean", "normal")


def copy_tokenizer(tok_dir: str | Path, out_dir: str | Path) -> None:
    tok_dir, out_dir = Path(tok_dir), Path(out_dir)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out_dir / name)


def tokenizer_len(tok_dir: str | Path) -> int:
    tok_dir = Path(tok_dir)
    if not tok_dir.is_dir() or not ((tok_dir / "tokenizer.json").is_file() or (tok_dir / "tokenizer.model").is_file()):
        raise UserError(f"{tok_dir}: not a tokenizer folder (needs tokenizer.json or tokenizer.model; `make vocab` writes one to RUN/vocab)")
    return len(load_tokenizer(tok_dir))


def load_tokenizer(tok_dir: str | Path):
    from transformers import AutoTokenizer

    check_tokenizer_files(tok_dir)
    if (Path(tok_dir) / "config.json").is_file():
        read_config(tok_dir)  # AutoTokenizer reads a model folder's config.json too
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{tok_dir}: no loadable tokenizer (tokenizer.json / tokenizer.model: {why})") from None


def check_sizes(model, model_dir, tok_len: int | None = None, tok_dir=None) -> None:
    """config.vocab_size == embedding rows == LM-head rows (== len(tokenizer) when given)."""
    emb = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else emb
    cfg = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    if not (cfg == emb == head):
        raise UserError(
            f"{model_dir}: config.json says vocab_size {cfg} but the weights have {emb} embedding rows and {head} LM-head rows; "
            f"fix config.json (vocab_size: {emb}) or re-export the model (a merged model left at 32,000 is the usual cause)"
        )
    if tok_len is not None and tok_len != emb:
        raise UserError(
            f"{model_dir} has {emb:,} embedding rows but {tok_dir} has {tok_len:,} tokens: the model and tokenizer disagree "
            f"(e.g. the 49,953 Chinese-LLaMA vs 49,954 Chinese-Alpaca tokenizer); use the tokenizer the model was resized "
            f"with, or run `python -m pretrain resize --model {model_dir} --tokenizer {tok_dir} --out DIR`"
        )


@torch.no_grad()
def init_new_rows(model, first: int, n_new: int, init: str, sources: list[list[int]] | None = None, seed: int = 0):
    """Rows first .. first + n_new of the input embeddings (and of an untied LM head): normal, the mean of the rows
    before `first`, or (subword-mean) the mean of each new row's source ids (an empty list: the plain mean)."""
    mats = [model.get_input_embeddings().weight]
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight.data_ptr() != mats[0].data_ptr():
        mats.append(out_emb.weight)
    gen = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    for w in mats:
        old_rows = w[:first].float()
        if init == "normal":
            w[first:first + n_new] = (torch.randn(n_new, w.shape[1], generator=gen) * std).to(w.dtype)
        elif init == "mean":
            w[first:first + n_new] = old_rows.mean(0).to(w.dtype)
        else:
            if sources is None or len(sources) != n_new:
                raise ValueError("subword-mean needs one source id list per new row")
            fallback = old_rows.mean(0)
            for k, ids in enumerate(sources):
                w[first + k] = (old_rows[ids].mean(0) if ids else fallback).to(w.dtype)


@torch.no_grad()
def resize_model(model, new_size: int, init: str, sources: list[list[int]] | None = None, seed: int = 0):
    if init not in INITS:
        raise UserError(f"--init {init!r}: choose one of {', '.join(INITS)}")
    old = model.get_input_embeddings().weight.shape[0]
    if new_size < old:
        raise UserError(f"tokenizer has {new_size:,} tokens, fewer than the model's {old:,} rows: shrinking would drop trained rows")
    # mean_resizing=False: we set the new rows ourselves; pad_to_multiple_of is never used (no padding of the vocab)
    model.resize_token_embeddings(new_size, mean_resizing=False)
    model.config.vocab_size = new_size
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().vocab_size = new_size
    n_new = new_size - old
    if n_new == 0:
        return model
    tied = model.config.tie_word_embeddings if hasattr(model.config, "tie_word_embeddings") else False
    init_new_rows(model, old, n_new, init, sources, seed)
    if tied:
        model.tie_weights()
    return model


EMBEDDING_MODULES = ("embed_tokens", "lm_head")


def lora_tying(model, targets, modules_to_save) -> dict:
    """{"ensure_weight_tying": True} when the model ties its LM head to the input embedding and the adapter trains
    one of them; else {}. Without it peft gives embed_tokens and lm_head separate trainable copies: the tied model
    comes out of training untied (twice the trainable rows, and a merged checkpoint whose config says tied while its
    two matrices differ)."""
    touched = any(m in EMBEDDING_MODULES for m in [*(targets or []), *(modules_to_save or [])])
    if not touched or not getattr(model.config, "tie_word_embeddings", False):
        return {}
    # tied in fact, not only in the config: an adapter chain merged from an older, untied adapter keeps its two
    # trained matrices apart (tying would replace the LM head by the embedding)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None:
        return {}
    same = inp.weight is out.weight or (inp.weight.shape == out.weight.shape and torch.equal(inp.weight, out.weight))
    return {"ensure_weight_tying": True} if same else {}


def checkpoint_vocab_rows(model_dir: Path) -> dict:
    """Row counts of embed_tokens / lm_head as stored in the safetensors files, read from their headers only."""
    return {k: shape[0] for k, shape in check_weight_files(model_dir).items()
            if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")}


def _precheck_config(model_dir: Path) -> None:
    """transformers v5 re-initialises mismatched rows with only a warning; a stale vocab_size must stop us instead."""
    cfg = read_config(model_dir)
    vs = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    for key, n in checkpoint_vocab_rows(model_dir).items():
        if vs is not None and n != vs:
            raise UserError(
                f"{model_dir}/config.json says vocab_size {vs:,} but {key} in the weights has {n:,} rows; set "
                f"\"vocab_size\": {n} in config.json (a merged or resized model left at 32,000 is the usual cause)"
            )


def load_model_dir(model_dir: str | Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a Hugging Face model folder (no config.json); convert it first, e.g. `python -m pretrain convert-llama2c`")
    _precheck_config(model_dir)
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "size mismatch" in str(e):
            raise UserError(f"{model_dir}: weights do not match config.json ({msg}); config.vocab_size is probably stale") from None
        raise UserError(f"{model_dir}: cannot load the model ({msg})") from None


def load_peft_chain(base, adapters, dtype=None):
    """Base + adapters the way peft does it: earlier ones merged by peft, the last one live."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _precheck_config(Path(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or torch.float32)
    for j, ap in enumerate(adapters):
        ad_vocab = adapter_vocab_rows(ap)
        if ad_vocab and ad_vocab != model.get_input_embeddings().weight.shape[0]:
            # rows are replaced by the adapter's saved matrices right after; init does not matter
            model.resize_token_embeddings(ad_vocab, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(ap))
        if j < len(adapters) - 1:
            model = model.merge_and_unload()
    model.eval()
    return model


def adapter_vocab_rows(adapter_dir) -> int | None:
    """Rows of the embed_tokens / lm_head an adapter saved (modules_to_save), from its safetensors header."""
    from safetensors import safe_open

    p = Path(adapter_dir) / "adapter_model.safetensors"
    if not p.is_file():
        return None
    with safe_open(str(p), framework="pt") as f:
        for k in f.keys():
            if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight"):
                return f.get_slice(k).get_shape()[0]
    return None


def load_adapter_chain(base, adapters, dtype=None, log=print, merge: bool = False):
    """(model, Chain): `adapters` checked against their lineage records and applied on their base (`base`, or the
    recorded one when None; a given base must have the recorded weights)."""
    import json

    from zhllama.lineage import resolve_chain

    chain = resolve_chain(base, list(adapters), log=log)
    order = list(chain.adapters)
    cfg = Path(order[-1]) / "resolved_config.json"
    if not chain.verified and len(adapters) == 1 and cfg.is_file():
        earlier = json.loads(cfg.read_text(encoding="utf-8")).get("pretrain_adapter")
        if earlier:  # an SFT adapter from before lineage records names its pretrain adapter here
            order.insert(0, earlier)
    model = load_peft_chain(chain.base, order, dtype=dtype)
    if merge:
        model = model.merge_and_unload()
    return model, chain
