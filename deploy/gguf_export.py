"""A merged LLaMA folder -> one GGUF file for llama.cpp, written with the `gguf` library.

What goes in: the weights (q/k rows permuted into llama.cpp's rotary layout, norms always f32), the
SentencePiece vocabulary with its scores and piece types (from `tokenizer.model`, so llama.cpp tokenizes
exactly like sentencepiece; a byte-level tokenizer.json folder, Llama-3 / Qwen-2.5 and their extensions, is
written as llama.cpp's gpt2 vocabulary by deploy.gguf_bytelevel), BOS on, the dummy-prefix flag, the chat template (the folder's
`chat_template.jinja`, i.e. the prompt format the model was trained with), `</s>` as the only
end-of-generation token (llama.cpp would also stop on `[PAD]`, which it takes for a fill-in-the-middle
pad unless one is named: EOS is named), and `general.name`.

Types: f32, f16, q8_0 and q4_0 (round-to-nearest, the paper's 4-bit deployment). Tensors are converted
and written one at a time (a 7B model never sits in memory twice); rows that are not a multiple of the
32-value quantization block stay f16, and q4_0 keeps the output head at q8_0 (llama.cpp's own quantize
keeps it at 6 bits or more, since the head dominates the quality loss). The file is written to a
unique temporary file beside FILE and renamed when complete, under a lock on FILE (.FILE.lock), so two
exports to one FILE never mix and a failed one (full disk, read-only folder) leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from zhllama.errors import UserError

TYPES = ("f32", "f16", "q8_0", "q4_0")
# k-quants come from llama.cpp's own quantize (llama-cpp-python exposes llama_model_quantize), applied to
# an f32 file written here; tensors whose rows do not fit the 256-value k-blocks get llama.cpp's fallback.
LLAMA_QUANT = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}   # LLAMA_FTYPE_MOSTLY_*

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str | None:
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise UserError(f"weight {hf_name!r} has no place in a LLaMA GGUF (not a LlamaForCausalLM checkpoint?)")


def permute_qk(w, n_head: int):
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), as llama.cpp's converter does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weights(model_dir: Path):
    """(name, shape, loader) for every tensor of the folder's safetensors, in file order; never loads all."""
    from safetensors import safe_open

    from zhllama.models import check_weight_files

    index = model_dir / "model.safetensors.index.json"
    if index.is_file() or (model_dir / "model.safetensors").is_file():
        check_weight_files(model_dir)  # every header, against the file sizes: a truncated file is named here
        files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) if index.is_file()
                 else ["model.safetensors"])
    else:
        bins = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = f" (found {', '.join(bins)}: pickled weights are not loaded, convert them to safetensors)" if bins else ""
        raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")
    out = []
    for f in files:
        path = str(model_dir / f)
        with safe_open(path, framework="pt") as h:
            for k in h.keys():
                out.append((k, tuple(h.get_slice(k).get_shape()), path))
    return out


def _load(path: str, name: str):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as h:
        return h.get_tensor(name).float().numpy()


def read_vocab(model_dir: Path, n_rows: int):
    """(pieces, scores, types, add_dummy_prefix) from tokenizer.model; rows past the vocabulary are UNUSED."""
    from sentencepiece import sentencepiece_model_pb2

    p = model_dir / "tokenizer.model"
    if not p.is_file():
        raise UserError(f"{model_dir}: no tokenizer.model (the SentencePiece model that `sft merge` copies beside "
                        "the weights); llama.cpp needs its scores and piece types")
    m = sentencepiece_model_pb2.ModelProto()
    try:
        m.ParseFromString(p.read_bytes())
    except Exception:  # protobuf's DecodeError and its C implementation's own types
        m.Clear()
    if not len(m.pieces):
        raise UserError(f"{p}: not a SentencePiece model (truncated, empty or another kind of file)")
    if m.trainer_spec.model_type != m.trainer_spec.BPE and m.trainer_spec.model_type != m.trainer_spec.UNIGRAM:
        raise UserError(f"{p}: model type {m.trainer_spec.model_type} is not BPE or unigram")
    pieces = [x.piece for x in m.pieces]
    if len(pieces) > n_rows:
        raise UserError(f"{p} has {len(pieces):,} pieces but the model only {n_rows:,} embedding rows "
                        "(the 49,953 vs 49,954 mix-up?)")
    scores = [x.score for x in m.pieces]
    types = [int(x.type) for x in m.pieces]   # sentencepiece's NORMAL..BYTE numbering is GGUF's TokenType
    for i in range(len(pieces), n_rows):
        pieces.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(5)  # UNUSED
    return pieces, scores, types, bool(m.normalizer_spec.add_dummy_prefix)


def default_name(model_dir: Path) -> str:
    """RUN/sft/merged -> "zhllama RUN"; any other folder -> its own name."""
    model_dir = model_dir.resolve()
    if model_dir.parent.name == "sft":
        return f"zhllama {model_dir.parent.parent.name}"
    return model_dir.name


def chat_template(model_dir: Path) -> str | None:
    from zhllama.chat import JINJA_FILE, TEMPLATE_FILE, get, load_name

    p = model_dir / JINJA_FILE
    if p.is_file():
        return p.read_text(encoding="utf-8")
    if (model_dir / TEMPLATE_FILE).is_file():
        return get(load_name(model_dir)).jinja()
    return None


def _tensor_type(gname: str, shape, ftype: str):
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or ftype == "f32":
        return Q.F32
    if ftype == "f16" or shape[-1] % 32:
        return Q.F16
    if ftype == "q4_0" and gname == "output.weight":
        return Q.Q8_0
    return Q.Q8_0 if ftype == "q8_0" else Q.Q4_0


def export(model_dir, out, ftype: str = "f16", name: str | None = None, log=print) -> dict:
    import numpy as np
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType, quants
    from gguf import GGMLQuantizationType as Q
    from tqdm import tqdm

    from zhllama.models import read_config

    model_dir, out = Path(model_dir), Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; deploy gguf writes one file: pass FILE.gguf (e.g. {out / 'model.gguf'})")
    if ftype in LLAMA_QUANT:
        return _llama_quantize(model_dir, out, ftype, name, log)
    if ftype not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES + tuple(LLAMA_QUANT))}, got {ftype!r}")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{model_dir}: not a model folder (no config.json); pass RUN/sft/merged")
    if (model_dir / "adapter_config.json").is_file():
        raise UserError(f"{model_dir} is a PEFT adapter; merge it first (`python -m sft merge`) and export the merged folder")
    cfg = read_config(model_dir)
    if cfg.get("model_type") != "llama":
        raise UserError(f"{cfg_path}: model_type {cfg.get('model_type')!r}; only LLaMA models are exported")
    if cfg.get("rope_scaling"):
        raise UserError(f"{cfg_path}: rope_scaling {cfg['rope_scaling']} is not exported (plain RoPE only)")
    missing = [k for k in ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
               if k not in cfg]
    if missing:
        raise UserError(f"{cfg_path}: no {', '.join(missing)}; not the config.json of a LLaMA model")
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    weights = _weights(model_dir)
    names = {w[0] for w in weights}
    rows = next((s for n, s, _ in weights if n == "model.embed_tokens.weight"), (None,))[0]
    if rows is None:
        raise UserError(f"{model_dir}: the weights have no model.embed_tokens.weight; not a LlamaForCausalLM checkpoint")
    if rows != cfg["vocab_size"]:
        raise UserError(f"{cfg_path}: vocab_size {cfg['vocab_size']:,} but embed_tokens has {rows:,} rows")
    from vocab.bytelevel import is_bytelevel

    bytelevel = None
    if is_bytelevel(model_dir):  # Llama-3 / Qwen-2.5 and their extensions: llama.cpp's gpt2 tokenizer
        from deploy.gguf_bytelevel import read_bytelevel_vocab

        bytelevel = read_bytelevel_vocab(model_dir, rows)
        pieces = bytelevel.tokens
    else:
        pieces, scores, types, dummy_prefix = read_vocab(model_dir, rows)
    template = chat_template(model_dir)
    name = name or default_name(model_dir)

    w = GGUFWriter(None, "llama")
    w.add_name(name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(rows)
    w.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                     "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[ftype])
    if ftype in ("q8_0", "q4_0"):
        w.add_quantization_version(GGML_QUANT_VERSION)
    if bytelevel is not None:
        from deploy.gguf_bytelevel import write_vocab

        write_vocab(w, bytelevel)
    else:
        _write_sentencepiece_vocab(w, cfg, pieces, scores, types, dummy_prefix)
    if template is not None:
        w.add_chat_template(template)
    else:
        log(f"warning: {model_dir} has no chat template (chat_template.jinja); llama.cpp will guess the prompt format")
    n_tensors = _write_tensors(w, model_dir, out, ftype, cfg, weights, names, n_head, n_kv, log)
    info = {"gguf": str(out), "type": ftype, "name": name, "tensors": n_tensors, "vocab": rows,
            "bytes": out.stat().st_size, "chat_template": template is not None}
    if bytelevel is not None:
        info["tokenizer"] = {"model": "gpt2", "pre": bytelevel.pre, "merges": len(bytelevel.merges)}
    log(f"wrote {out} ({ftype}, {n_tensors} tensors, vocab {rows:,}, {out.stat().st_size / 2**20:.1f} MiB, "
        f"name {name!r}{', chat template' if template else ''})")
    return info


def _write_sentencepiece_vocab(w, cfg, pieces, scores, types, dummy_prefix) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(cfg.get("bos_token_id", 1) if cfg.get("bos_token_id") is not None else 1)
    w.add_eos_token_id(cfg.get("eos_token_id", 2) if isinstance(cfg.get("eos_token_id"), int) else 2)
    w.add_unk_token_id(0)
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(cfg["pad_token_id"])
    eos_id = cfg.get("eos_token_id", 2) if isinstance(cfg.get("eos_token_id"), int) else 2
    if "[PAD]" in pieces or "<PAD>" in pieces:
        # llama.cpp takes a piece spelled [PAD] or <PAD> for a fill-in-the-middle pad when no FIM pad id is
        # given, and stops generating on it. Naming EOS as the FIM pad keeps EOS the only stop token.
        from gguf import Keys

        w.add_uint32(Keys.Tokenizer.FIM_PAD_ID, eos_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(dummy_prefix)


def _write_tensors(w, model_dir, out, ftype, cfg, weights, names, n_head, n_kv, log) -> int:
    import numpy as np
    from gguf import quants
    from gguf import GGMLQuantizationType as Q
    from tqdm import tqdm

    plan = []
    for hf, shape, path in weights:
        g = gguf_name(hf)
        if g is None:
            continue
        qt = _tensor_type(g, shape, ftype)
        if qt in (Q.F32, Q.F16):
            nbytes = int(np.prod(shape)) * (4 if qt == Q.F32 else 2)
            w.add_tensor_info(g, shape, np.float32 if qt == Q.F32 else np.float16, nbytes)
        else:
            bshape = quants.quant_shape_to_byte_shape(shape, qt)
            w.add_tensor_info(g, bshape, np.uint8, int(np.prod(bshape)), raw_dtype=qt)
        plan.append((hf, g, shape, path, qt))
    if "lm_head.weight" not in names and not cfg.get("tie_word_embeddings", False):
        raise UserError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false")

    from zhllama.runfolder import atomic_file, lock_file

    with lock_file(out), atomic_file(out) as tmp:
        w.path = tmp
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for hf, g, shape, path, qt in tqdm(plan, desc=f"gguf {ftype}", unit="tensor", disable=len(plan) < 50):
                t = _load(path, hf)
                if g.endswith("attn_q.weight"):
                    t = permute_qk(t, n_head)
                elif g.endswith("attn_k.weight"):
                    t = permute_qk(t, n_kv)
                if qt == Q.F32:
                    data = t.astype(np.float32)
                elif qt == Q.F16:
                    data = t.astype(np.float16)
                else:
                    data = quants.quantize(t.astype(np.float32), qt)
                w.write_tensor_data(np.ascontiguousarray(data))
        finally:
            with contextlib.suppress(OSError):  # a full disk also fails the final flush: the write's error counts
                w.close()
    return len(plan)


def _llama_quantize(model_dir: Path, out: Path, ftype: str, name: str | None, log) -> dict:
    import os

    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--type {ftype} uses llama.cpp's quantize: install llama-cpp-python "
                        "(make setup-integration)") from None
    from zhllama.runfolder import atomic_file, lock_file

    with lock_file(out), atomic_file(out) as tmp:
        src = tmp.with_name(tmp.name + ".f32")  # unique because tmp is
        try:
            info = export(model_dir, src, "f32", name=name, log=lambda *_: None)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = LLAMA_QUANT[ftype]
            params.nthread = os.cpu_count() or 1
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
            if rc != 0:
                raise UserError(f"llama.cpp's quantize to {ftype} failed (code {rc}) for {model_dir}")
        finally:
            src.unlink(missing_ok=True)
    info.update(gguf=str(out), type=ftype, bytes=out.stat().st_size)
    log(f"wrote {out} ({ftype} by llama.cpp's quantize, {out.stat().st_size / 2**20:.1f} MiB, name {info['name']!r})")
    return info
