"""Check a GGUF in llama.cpp (llama-cpp-python) against the folder it came from.

* tokenization: llama.cpp vs sentencepiece (`tokenizer.model`) on the project's probe lines
  (corpora.probes: Chinese, English, mixed, whitespace-heavy), BOS included: every line must match;
* next-token logits: llama.cpp vs transformers (float32) at every position of the merge-verification
  prompts rendered with the model's template: argmax agreement must be 100% for f32/f16, >= 95% for
  q8_0 and q6_k, >= 90% for q5_k_m, >= 85% for q4_0 and q4_k_m; the max absolute logit difference is reported;
* metadata: `tokenizer.chat_template` is the folder's template, `</s>` is the only end-of-generation
  token, BOS is added.
Results go to FILE.verify.json; a failed check is an error (exit 2) after the file is written.
"""
from __future__ import annotations

import json
from pathlib import Path

from zhllama.errors import UserError

MIN_ARGMAX = {"f32": 1.0, "f16": 1.0, "q8_0": 0.95, "q6_k": 0.95, "q5_k_m": 0.9, "q4_k_m": 0.85, "q4_0": 0.85}


def load_llama(path, n_ctx: int = 2048, logits_all: bool = False, n_threads: int | None = None, kv_f32: bool = False):
    """A llama-cpp-python model; kv_f32 keeps the KV cache in f32 (llama.cpp's default is f16) for exact comparisons."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError("llama-cpp-python is not installed: CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
                        "llama-cpp-python==0.3.36 (builds llama.cpp from source, about 4 minutes)") from None
    import os

    kv = dict(type_k=0, type_v=0) if kv_f32 else {}   # GGML_TYPE_F32
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, seed=0,
                 n_threads=n_threads or min(4, os.cpu_count() or 1), **kv)


def eog_tokens(llm) -> list[int]:
    """Every id llama.cpp stops generation on."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def verify(gguf_path, model_dir, ftype: str, log=print) -> dict:
    import numpy as np
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corpora.probes import probe_set
    from deploy.gguf_export import chat_template
    from sft.merge import PROBES
    from zhllama.chat import get, load_name

    from vocab.bytelevel import is_bytelevel

    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    llm = load_llama(gguf_path, n_ctx=512, logits_all=True, kv_f32=True)
    bytelevel = is_bytelevel(model_dir)
    if bytelevel:  # the reference is the folder's own tokenizer.json (Llama-3 adds BOS, Qwen-2.5 does not)
        hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
        add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token") == "true")
        reference = lambda line: hf_tok(line)["input_ids"]  # noqa: E731
    else:
        sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        add_bos = True
        reference = lambda line: [sp.bos_id()] + sp.encode(line)  # noqa: E731
    res: dict = {"gguf": str(gguf_path), "model": str(model_dir), "type": ftype}

    tok_res, bad = {}, []
    for kind, lines in probe_set().items():
        diff = 0
        for line in lines:
            want = reference(line)
            got = llm.tokenize(line.encode("utf-8"), add_bos=add_bos, special=False)
            if got != want:
                diff += 1
                if len(bad) < 5:
                    bad.append({"text": line, "sentencepiece": want, "llama.cpp": got})
        tok_res[kind] = {"lines": len(lines), "differ": diff}
    res["tokenization"] = {"by_kind": tok_res, "examples": bad,
                           "ok": all(v["differ"] == 0 for v in tok_res.values())}

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    t = get(load_name(model_dir))
    prompts = [tok(t.render(p))["input_ids"] for p in PROBES]
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    agree = n = 0
    max_diff = 0.0
    for ids in prompts:
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
        llm.reset()
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += len(ids)
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
    need = MIN_ARGMAX[ftype]
    res["logits"] = {"positions": n, "argmax_agree": agree, "argmax_rate": agree / n, "need": need,
                     "max_abs_diff": max_diff, "ok": agree / n >= need}

    meta = llm.metadata
    want_t = chat_template(model_dir)
    eog = eog_tokens(llm)
    res["metadata"] = {"general.name": meta.get("general.name"), "chat_template_equal": meta.get("tokenizer.chat_template") == want_t,
                       "eog_tokens": eog, "eos": tok.eos_token_id, "add_bos": meta.get("tokenizer.ggml.add_bos_token")}
    if bytelevel:
        # llama.cpp also stops on the end-of-turn/-message specials it recognises (<|eot_id|>, <|eom_id|>,
        # <|end_of_text|>): the tokenizer's EOS must be one of them, and every one a special token
        specials = set(tok.all_special_ids) | {i for i in tok.added_tokens_decoder}
        res["metadata"]["ok"] = res["metadata"]["chat_template_equal"] and tok.eos_token_id in eog and set(eog) <= specials
    else:
        res["metadata"]["ok"] = res["metadata"]["chat_template_equal"] and eog == [tok.eos_token_id]
    res["ok"] = res["tokenization"]["ok"] and res["logits"]["ok"] and res["metadata"]["ok"]
    del llm
    out = gguf_path.with_name(gguf_path.name + ".verify.json") if not gguf_path.name.endswith(".gguf") else \
        gguf_path.with_suffix(".verify.json")
    from zhllama.manifest import write_json

    write_json(out, res)
    tl = sum(v["lines"] for v in tok_res.values())
    td = sum(v["differ"] for v in tok_res.values())
    log(f"verify {gguf_path.name}: tokenization {tl - td}/{tl} probe lines equal to {'tokenizer.json' if bytelevel else 'sentencepiece'}; "
        f"argmax {agree}/{n} = {100 * agree / n:.1f}% (need >= {100 * need:.0f}%), max |logit diff| {max_diff:.3g}; "
        f"chat template {'equal' if res['metadata']['chat_template_equal'] else 'DIFFERENT'}; EOG tokens {eog} "
        f"-> {'OK' if res['ok'] else 'FAILED'} ({out})")
    if not res["ok"]:
        raise UserError(f"GGUF verification failed for {gguf_path}; see {out}")
    return res
