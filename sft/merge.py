"""Merge LoRA adapters into a base model, shard by shard, then verify the result by its logits.

Order matters and follows the reference (LLaMA-Plus, then Alpaca-Plus): adapters are applied in
the order given, each to the result of the previous ones. Per tensor:
  * a full matrix saved by an adapter (``modules_to_save``: embed_tokens, lm_head) replaces the
    current one; this is also what resizes the vocabulary (32,000 -> 49,953 -> 49,954 rows);
  * a LoRA pair adds ``B @ A * alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), computed in float32.
Only one base shard is in memory at a time (plus the adapters, which are small next to a 13B
model), so the merge needs about 1x the model in RAM, not 2x.

Verification loads, one after the other, the unmerged PEFT model (earlier adapters merged by peft's
own code, the last one kept as a live LoRA) and the merged folder, both in float32, and compares
next-token logits on probe prompts rendered with the template. It fails when the max absolute
difference or the top-1 agreement is beyond the tolerance for the saved dtype.
"""
from __future__ import annotations

import gc
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.errors import UserError

PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json")
# (max abs logit difference, min top-1 agreement) when the merged weights are stored in that dtype
TOLERANCE = {"float32": (1e-4, 1.0), "bfloat16": (0.25, 0.95), "float16": (0.05, 0.97)}
PROBES = ["用一句话介绍你自己。", "把下面的句子翻译成英文。\n今天天气很好。", "1 + 2 等于几？",
          "List three colors.", "写一首关于春天的短诗。"]


@dataclass
class Adapter:
    path: Path
    config: dict
    tensors: dict            # module name (base naming, no ".weight") -> {"full"|"A"|"B": tensor}
    vocab_size: int | None   # rows of its saved embed_tokens / lm_head, if any
    tokenizer_len: int | None
    template: str | None = None
    notes: list = field(default_factory=list)

    def scaling(self, module: str, r: int) -> float:
        alpha = self.config.get("lora_alpha", r)
        for pat, a in (self.config.get("alpha_pattern") or {}).items():
            if module.endswith(pat) or pat in module:
                alpha = a
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(r)
        return alpha / r


def load_adapter(path) -> Adapter:
    from safetensors.torch import load_file

    path = Path(path)
    cfg_p = path / "adapter_config.json"
    if not cfg_p.is_file():
        raise UserError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    cfg = json.loads(cfg_p.read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {cfg.get('peft_type')} is not supported; only LoRA adapters merge")
    if cfg.get("use_dora"):
        raise UserError(f"{path}: DoRA adapters are not supported by this merge")
    if cfg.get("fan_in_fan_out"):
        raise UserError(f"{path}: fan_in_fan_out adapters (GPT-2 style) are not LLaMA adapters")
    st = path / "adapter_model.safetensors"
    if st.is_file():
        raw = load_file(str(st))
    elif (path / "adapter_model.bin").is_file():
        import torch

        raw = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    if not raw:
        raise UserError(f"{path}: the adapter file holds no tensors (the empty-adapter bug: "
                        "it was saved before the LoRA layers were attached)")
    tensors: dict = {}
    for k, v in raw.items():
        name = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if name.endswith(".original_module.weight"):
            continue  # peft's save_embedding_layers copy of the untrained matrix
        if name.endswith(".modules_to_save.weight"):
            # the same trained matrix as NAME.weight, written again by save_embedding_layers
            if (PREFIX + name.replace(".modules_to_save.weight", ".weight")) in raw:
                continue
            name = name.replace(".modules_to_save.weight", ".weight")
        if name.endswith(".lora_A.weight"):
            tensors.setdefault(name[: -len(".lora_A.weight")], {})["A"] = v
        elif name.endswith(".lora_B.weight"):
            tensors.setdefault(name[: -len(".lora_B.weight")], {})["B"] = v
        elif name.endswith(".lora_embedding_A"):
            tensors.setdefault(name[: -len(".lora_embedding_A")], {})["EA"] = v
        elif name.endswith(".lora_embedding_B"):
            tensors.setdefault(name[: -len(".lora_embedding_B")], {})["EB"] = v
        elif name.endswith(".weight") and ".lora_" not in name and "token_adapter" not in name:
            # modules_to_save; older peft wrote ".modules_to_save.default.weight"-free names too
            mod = name[: -len(".weight")].replace(".modules_to_save.default", "").replace(".original_module", "")
            tensors.setdefault(mod, {})["full"] = v
        elif name.endswith(".bias"):
            raise UserError(f"{path}: tensor {k}: adapters with trained biases are not supported")
        else:
            raise UserError(f"{path}: tensor {k} is of a kind this merge does not know "
                            "(supported: LoRA A/B, full modules_to_save matrices)")
    for mod, parts in tensors.items():
        if ("A" in parts) != ("B" in parts) or ("EA" in parts) != ("EB" in parts):
            raise UserError(f"{path}: {mod} has only half of a LoRA pair")
    rows = {parts["full"].shape[0] for m, parts in tensors.items()
            if "full" in parts and m.split(".")[-1] in ("embed_tokens", "lm_head")}
    if len(rows) > 1:
        raise UserError(f"{path}: embed_tokens and lm_head have different row counts {sorted(rows)}")
    tok_len = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tok_len = tokenizer_length(path)
    vocab = rows.pop() if rows else None
    if vocab is not None and tok_len is not None and vocab != tok_len:
        raise UserError(f"{path}: its tokenizer has {tok_len:,} pieces but its embedding matrices have {vocab:,} rows "
                        "(mixing the 49,953 and 49,954 tokenizers?); the adapter and its tokenizer must come from the same run")
    from zhllama.chat import TEMPLATE_FILE, load_name

    template = load_name(path) if (path / TEMPLATE_FILE).is_file() else None
    return Adapter(path, cfg, tensors, vocab, tok_len, template)


def tokenizer_length(folder) -> int:
    from zhllama.models import load_tokenizer

    return len(load_tokenizer(folder))


def _base_shards(base: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = base / index
        if p.is_file():
            wm = json.loads(p.read_text(encoding="utf-8"))["weight_map"]
            return [base / f for f in dict.fromkeys(sorted(set(wm.values())))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (base / single).is_file():
            return [base / single]
    raise UserError(f"{base}: no model weights (model.safetensors, pytorch_model.bin or a sharded index)")


def _read_shard(path: Path):
    """Yield (name, tensor) one at a time so a shard never needs a second copy."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    else:
        import torch

        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for k in list(sd):
            yield k, sd.pop(k)


def _merge_tensor(name: str, w, adapters: list[Adapter], used: set):
    mod = name[: -len(".weight")] if name.endswith(".weight") else None
    if mod is None:
        return w
    out = w
    for ad in adapters:
        parts = ad.tensors.get(mod)
        if not parts:
            continue
        used.add((ad.path, mod))
        if "full" in parts:
            out = parts["full"]
        if "A" in parts:
            a, b = parts["A"].float(), parts["B"].float()
            r = a.shape[0]
            delta = (b @ a) * ad.scaling(mod, r)
            if delta.shape != out.shape:
                raise UserError(f"{ad.path}: LoRA delta for {mod} has shape {tuple(delta.shape)}, the weight has "
                                f"{tuple(out.shape)}: the adapter was trained on a different base")
            out = out.float() + delta
        if "EA" in parts:
            # LoRA on an embedding: lora_embedding_A is (r, vocab), B is (dim, r); weight is (vocab, dim)
            a, b = parts["EA"].float(), parts["EB"].float()
            delta = (b @ a).T * ad.scaling(mod, a.shape[0])
            if delta.shape != out.shape:
                raise UserError(f"{ad.path}: embedding LoRA for {mod} does not match its weight {tuple(out.shape)}")
            out = out.float() + delta
    return out


def _target_vocab(base: Path, cfg: dict, ads: list) -> tuple[int, Path | None]:
    """Rows of the merged model and the folder whose tokenizer it gets; UserError on any disagreement."""
    vocab = cfg.get("vocab_size")
    for ad in ads:
        if ad.vocab_size is not None:
            vocab = ad.vocab_size
        elif ad.tokenizer_len is not None and ad.tokenizer_len != vocab:
            raise UserError(f"{ad.path}: its tokenizer has {ad.tokenizer_len:,} pieces but the model it applies to has "
                            f"{vocab:,} rows and the adapter saves no embed_tokens/lm_head to resize with")
    tok_src = next((ad.path for ad in reversed(ads) if ad.tokenizer_len is not None), None)
    if tok_src is None and (base / "tokenizer_config.json").is_file():
        tok_src = base
    if tok_src is not None:
        n = tokenizer_length(tok_src)
        if n != vocab:
            raise UserError(f"tokenizer in {tok_src} has {n:,} pieces but the merged model would have {vocab:,} rows "
                            "(the classic 49,953 vs 49,954 mix-up); pass the adapters that belong to this tokenizer")
    return vocab, tok_src


def _write_shards(base: Path, ads: list, out: Path, tdtype, tied: bool, untie: bool, head_from_adapter: bool) -> int:
    """Merged weights, one base shard at a time; returns the number of shards."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards = _base_shards(base)
    used: set = set()
    weight_map, total = {}, 0
    seen_names = set()
    for i, shard in enumerate(tqdm(shards, desc="merge shards", unit="shard", disable=len(shards) < 2)):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, w in _read_shard(shard):
            seen_names.add(name)
            merged = _merge_tensor(name, w, ads, used)
            if name == "lm_head.weight" and tied and not untie:
                continue
            tensors[name] = merged.to(tdtype).contiguous()
        if i == len(shards) - 1:
            # lm_head absent from a tied base: the untied head comes from the adapter
            if untie and "lm_head.weight" not in seen_names:
                emb = None
                if not head_from_adapter:
                    emb = tensors.get("model.embed_tokens.weight")
                w = _merge_tensor("lm_head.weight", emb if emb is not None else torch.empty(0), ads, used)
                tensors["lm_head.weight"] = w.to(tdtype).contiguous()
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        gc.collect()
    unused = [f"{ad.path}:{m}" for ad in ads for m in ad.tensors if (ad.path, m) not in used]
    if unused:
        raise UserError(f"adapter tensors matched no base weight: {', '.join(unused[:5])} (adapter for a different architecture?)")
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8")
    return len(shards)


def _write_config(base: Path, cfg: dict, out: Path, vocab: int, dtype: str, untie: bool, tok_src) -> None:
    cfg = dict(cfg, vocab_size=vocab, dtype=dtype)
    cfg.pop("torch_dtype", None)
    if untie:
        cfg["tie_word_embeddings"] = False
    if tok_src is not None:
        for f in TOKENIZER_FILES:
            if (Path(tok_src) / f).is_file():
                shutil.copy2(Path(tok_src) / f, out / f)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out))
        if tok.pad_token_id is not None:
            cfg["pad_token_id"] = tok.pad_token_id
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", out / "generation_config.json")


def merge(base, adapters, out, dtype: str = "float16", log=print, verify: bool = True,
          atol: float | None = None, template: str | None = None) -> dict:
    """Everything is checked before a weight is read; the merged folder is written to OUT/.partial/ and moved into
    place (with result.json and manifest.json) only after it is complete and verified."""
    import torch

    from zhllama.chat import get, save_name
    from zhllama import runfolder
    from zhllama.lineage import resolve_chain
    from zhllama.models import check_weight_files, read_config

    out = Path(out)
    if dtype not in TOLERANCE:
        raise UserError(f"--dtype must be one of {', '.join(TOLERANCE)}, got {dtype!r}")
    if base is not None and not (Path(base) / "config.json").is_file():
        raise UserError(f"{base}: not a Hugging Face model folder (no config.json)")
    # the chain the adapters were trained as (lineage.json): one adapter brings its parents and base
    chain = resolve_chain(base, list(adapters or []), log=log)
    base = chain.base
    ads = [load_adapter(a) for a in chain.adapters]
    # no record when no adapter was instruction-tuned: chat then warns instead of assuming a template
    recorded = template or next((ad.template for ad in reversed(ads) if ad.template), None)
    tname = recorded or get(None).name  # the default only renders the verification probes
    get(tname)  # an unknown template fails here, before anything is written
    cfg = read_config(base)
    check_weight_files(base)  # a truncated or corrupt shard is named now, not after half the merge is written
    base_vocab = cfg.get("vocab_size")
    vocab, tok_src = _target_vocab(base, cfg, ads)
    tied = bool(cfg.get("tie_word_embeddings", False))
    head_from_adapter = any("lm_head" in ad.tensors and "full" in ad.tensors["lm_head"] for ad in ads)
    embed_from_adapter = any("model.embed_tokens" in ad.tensors for ad in ads)
    untie = tied and (head_from_adapter or (embed_from_adapter and any("lm_head" in ad.tensors for ad in ads)))
    with runfolder.lock(out, log=log):
        inputs = {"base": runfolder.input_entry(base), "adapters": [runfolder.input_entry(a.path) for a in ads]}
        config = {"stage": "sft.merge", "dtype": dtype, "template": tname, "verify": verify, "atol": atol}
        # same inputs and settings, and the merged files untouched since: nothing to redo
        if runfolder.decide(out, {"inputs": inputs, **config}, "auto", log=log, artefacts=("config.json",),
                            partial=False) == "up-to-date":
            log(f"{out} is up to date with its base and adapters; nothing to do")
            return runfolder.read_result(out)
        with runfolder.writing(out):  # a full disk: one line naming OUT; lock() removes the staged part
            stage = runfolder.staging(out)  # first: from here on a failure puts the previous result back
            runfolder.begin(out, config, {"inputs": inputs, **config})
            n_shards = _write_shards(base, ads, stage, getattr(torch, dtype), tied, untie, head_from_adapter)
            _write_config(base, cfg, stage, vocab, dtype, untie, tok_src)
            if recorded:
                save_name(stage, tname)
        log(f"merged {len(ads)} adapter(s) into {out}: vocab {base_vocab:,} -> {vocab:,}, dtype {dtype}, "
            f"{n_shards} shard(s), template {tname}")
        result = {"vocab_size": vocab, "base_vocab_size": base_vocab, "dtype": dtype, "template": tname,
                  "adapters": [str(a.path) for a in ads], "shards": n_shards, "chain": chain.to_json()}
        if verify:
            result["verify"] = verify_merge(base, [a.path for a in ads], stage, dtype, atol=atol, template=tname, log=log,
                                            chain=chain.to_json())
        parents = [runfolder.parent_entry(base)] + [runfolder.parent_entry(a.path) for a in ads]
        with runfolder.writing(out):
            return runfolder.finish(out, "sft.merge", result, inputs, parents, fingerprint={"inputs": inputs, **config})


def _probe_batch(tok, template_name: str):
    from zhllama.chat import get

    t = get(template_name)
    return [tok(t.render(p))["input_ids"] for p in PROBES]


def _logits(model, batches):
    import torch

    outs = []
    with torch.no_grad():
        for ids in batches:
            outs.append(model(input_ids=torch.tensor([ids])).logits[0].float())
    return outs


def verify_merge(base, adapters, merged, dtype: str, atol: float | None = None, template: str | None = None,
                 log=print, chain: dict | None = None) -> dict:
    """Merged vs unmerged logits; merge_verify.json also states which chain (base + adapters, hashes) this was."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhllama.chat import load_name
    from zhllama.models import load_peft_chain

    merged = Path(merged)
    tok = AutoTokenizer.from_pretrained(str(merged))
    batches = _probe_batch(tok, template or load_name(merged))
    ref_model = load_peft_chain(base, adapters)
    ref = _logits(ref_model, batches)
    del ref_model
    gc.collect()
    m = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    m.eval()
    got = _logits(m, batches)
    del m
    gc.collect()
    max_diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, got))
    n = sum(a.shape[0] for a in ref)
    tol, min_agree = TOLERANCE[dtype]
    if atol is not None:
        tol = atol
    ok = max_diff <= tol and agree / n >= min_agree
    log(f"verify: {len(batches)} probe prompts, {n} positions: max |logit diff| = {max_diff:.3g} "
        f"(tolerance {tol:g} for {dtype}), top-1 agreement {agree}/{n} = {100 * agree / n:.2f}% "
        f"(need >= {100 * min_agree:.0f}%) -> {'OK' if ok else 'FAILED'}")
    res = {"max_abs_diff": max_diff, "top1_agreement": agree / n, "positions": n, "tolerance": tol, "ok": ok,
           "chain": chain or {"verified": False, "base": {"path": str(base)},
                              "adapters": [{"path": str(a)} for a in adapters], "notes": ["lineage not checked"]}}
    (merged / "merge_verify.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    if not ok:
        raise UserError(f"merge verification failed: merged logits differ from the PEFT model's "
                        f"(max abs diff {max_diff:.3g} > {tol:g} or top-1 agreement {agree}/{n}); see {merged}/merge_verify.json")
    return res
