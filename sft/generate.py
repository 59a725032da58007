"""Generation and interactive chat with a merged (or adapter) model, using the model's own template.

The prompt is rendered by sft.template (the name recorded in the model folder) and tokenized alone,
BOS included, exactly as sft.data tokenizes training prompts, so serving sees what training taught.
Presets: paper = the paper's decoding (temperature 0.2, top-k 40, top-p 0.9, repetition penalty 1.1,
the later value); paper-1.3 = the same with the early 1.3 penalty; hf = transformers' defaults with
sampling; greedy = deterministic argmax (tests, reproducible demos).
"""
from __future__ import annotations

import json
from pathlib import Path

from zhllama.errors import UserError

PRESETS = {
    "paper": dict(do_sample=True, temperature=0.2, top_k=40, top_p=0.9, repetition_penalty=1.1),
    "paper-1.3": dict(do_sample=True, temperature=0.2, top_k=40, top_p=0.9, repetition_penalty=1.3),
    "hf": dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0),
    "greedy": dict(do_sample=False, repetition_penalty=1.0),
}


def load(model_dir, base=None, dtype: str = "float32"):
    """(model, tokenizer, template name). An adapter folder is applied on its base (--base or its config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.template import load_name

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: no such model folder")
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer.model").is_file():
        raise UserError(f"{d}: no tokenizer (tokenizer.json) in the model folder; `sft merge` copies it there")
    tok = AutoTokenizer.from_pretrained(str(d))
    td = getattr(torch, dtype)
    if (d / "adapter_config.json").is_file():
        from sft.merge import load_peft_chain

        base = base or json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise UserError(f"{d} is an adapter; pass --base MODEL_DIR (its recorded base {base!r} is not a folder)")
        chain = [d]
        sc = d / "resolved_config.json"
        if sc.is_file() and json.loads(sc.read_text()).get("pretrain_adapter"):
            chain.insert(0, json.loads(sc.read_text())["pretrain_adapter"])
        model = load_peft_chain(base, chain, dtype=td)
    else:
        if not (d / "config.json").is_file():
            raise UserError(f"{d}: not a model folder (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=td)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows != len(tok):
        raise UserError(f"{d}: model has {rows:,} embedding rows but its tokenizer {len(tok):,} pieces "
                        "(config.vocab_size left unpatched or the wrong tokenizer copied?)")
    model.eval()
    return model, tok, load_name(d)


def generation_kwargs(tok, preset: str, max_new_tokens: int, seed: int | None = None) -> dict:
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    kw = dict(PRESETS[preset], max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if not kw["do_sample"]:
        kw.update(temperature=None, top_k=None, top_p=None)
    return kw


def generate(model, tok, prompt_text: str, preset: str = "paper", max_new_tokens: int = 400,
             seed: int | None = 0, stream: bool = False) -> str:
    """Continue an already rendered prompt; returns the decoded new text only."""
    import torch
    from transformers import TextStreamer

    if seed is not None:
        torch.manual_seed(seed)
    ids = torch.tensor([tok(prompt_text)["input_ids"]])
    kw = generation_kwargs(tok, preset, max_new_tokens)
    if stream:
        kw["streamer"] = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def answer(model, tok, template: str, instruction: str, input: str = "", **kw) -> str:
    from sft.template import get

    return generate(model, tok, get(template).render(instruction, input), **kw)


def chat(model, tok, template: str, preset: str = "paper", max_new_tokens: int = 400, context: int = 2048,
         read=input, write=print) -> list[tuple[str, str]]:
    """Multi-turn loop: turns are concatenated in the template; oldest turns are dropped past `context` tokens."""
    from sft.template import get

    t = get(template)
    history: list[tuple[str, str]] = []
    write(f"chat ({template} template, preset {preset}); /reset clears history, /quit or Ctrl-D exits")
    while True:
        try:
            q = read("user> ")
        except EOFError:
            write("")
            break
        q = q.strip()
        if not q:
            continue
        if q in ("/quit", "/exit"):
            break
        if q == "/reset":
            history.clear()
            write("(history cleared)")
            continue
        prompt = t.render_conversation(history, q)
        while history and len(tok(prompt)["input_ids"]) + max_new_tokens > context:
            history.pop(0)
            prompt = t.render_conversation(history, q)
        write("assistant> ", end="", flush=True) if write is print else write("assistant> ")
        a = generate(model, tok, prompt, preset=preset, max_new_tokens=max_new_tokens, seed=None, stream=True)
        history.append((q, a.strip()))
    return history
