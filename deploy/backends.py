"""Generation backends for the server: transformers for model folders, llama.cpp for GGUF files.

Both render prompts with the model's own chat template (the folder's `chat_template.jinja`, or the
GGUF's `tokenizer.chat_template`, which `deploy gguf` copies from it), so the server feeds the model the
token ids it was trained on. Both stream text pieces from a worker thread and stop on EOS, on
max_tokens, or when `should_stop()` says so (the per-request timeout, a client that went away).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from zhllama.errors import UserError


@dataclass
class Sampling:
    max_tokens: int
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass
class Outcome:
    completion_tokens: int = 0
    finish_reason: str = "stop"


class TransformersBackend:
    """A merged model folder (safetensors only, no remote code), CPU or the first GPU."""

    def __init__(self, model_dir, device: str = "auto", dtype: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = Path(model_dir)
        if (d / "adapter_config.json").is_file():
            raise UserError(f"{d} is a PEFT adapter; serve the merged folder (`python -m sft merge`)")
        if not (d / "config.json").is_file():
            raise UserError(f"{d}: not a model folder (no config.json)")
        if not list(d.glob("*.safetensors")):
            raise UserError(f"{d}: no .safetensors weights (pickled .bin weights are never loaded)")
        if not (d / "chat_template.jinja").is_file():
            raise UserError(f"{d}: no chat_template.jinja; write it with `python -m deploy template --model {d}`")
        from zhllama.models import check_model_dir

        check_model_dir(d)  # a truncated or corrupt file is named before the server starts
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        td = getattr(torch, dtype) if dtype else (torch.float32 if device == "cpu" else torch.float16)
        self.tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(str(d), dtype=td, use_safetensors=True,
                                                          trust_remote_code=False).to(device).eval()
        self.device = device
        self.name = d.resolve().name if d.resolve().name != "merged" else f"{d.resolve().parent.parent.name}-sft-merged"
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tok(prompt)["input_ids"])

    def stream(self, ids: list[int], s: Sampling, should_stop: Callable[[], bool], outcome: Outcome) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        from zhllama.chat.stops import StopWhen

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        kw = dict(max_new_tokens=s.max_tokens, do_sample=s.do_sample, repetition_penalty=s.repetition_penalty,
                  eos_token_id=self.tok.eos_token_id,
                  pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
                  streamer=streamer, stopping_criteria=StoppingCriteriaList([StopWhen(should_stop)]))
        if s.do_sample:
            kw.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        x = torch.tensor([ids], device=self.device)
        box: dict = {}

        def run():
            try:
                if s.seed is not None:
                    torch.manual_seed(s.seed)
                with torch.no_grad():
                    box["out"] = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
            except BaseException as e:  # surfaced in the request, never a silent hang
                box["error"] = e
                streamer.end()

        th = threading.Thread(target=run, daemon=True)
        th.start()
        yield from streamer
        th.join()
        if "error" in box:
            raise box["error"]
        new = box["out"][0, len(ids):].tolist()
        outcome.completion_tokens = len(new)
        outcome.finish_reason = "stop" if new and new[-1] == self.tok.eos_token_id else "length"


class LlamaCppBackend:
    """A GGUF file through llama-cpp-python; the prompt is rendered with the file's own chat template."""

    def __init__(self, gguf_path, n_ctx: int = 2048, n_threads: int | None = None, kv_f32: bool = False):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        from deploy.gguf_verify import load_llama

        p = Path(gguf_path)
        if not p.is_file():
            raise UserError(f"{p}: no such GGUF file")
        self.llm = load_llama(p, n_ctx=n_ctx, n_threads=n_threads, kv_f32=kv_f32)
        meta = self.llm.metadata
        src = meta.get("tokenizer.chat_template")
        if not src:
            raise UserError(f"{p} has no tokenizer.chat_template; export it with `python -m deploy gguf`")

        def raise_exception(msg):
            raise UserError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(src)
        vocab = [self.llm.detokenize([i], special=True).decode("utf-8", "replace") for i in (1, 2)]
        self.bos, self.eos = vocab
        self.eos_id = self.llm.token_eos()
        self.name = meta.get("general.name") or p.stem
        self.context = n_ctx

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                    eos_token=self.eos)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def text_ids(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)

    def stream(self, ids: list[int], s: Sampling, should_stop: Callable[[], bool], outcome: Outcome) -> Iterator[str]:
        kw = dict(max_tokens=s.max_tokens, repeat_penalty=s.repetition_penalty, stream=True,
                  seed=(s.seed & 0xFFFFFFFF) if s.seed is not None else 0)   # llama.cpp seeds are 32-bit
        if s.do_sample:
            kw.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0)
        else:
            kw.update(temperature=0.0, top_k=1, top_p=1.0)
        n, finish = 0, "length"
        self.llm.reset()
        for chunk in self.llm.create_completion(prompt=ids, **kw):
            c = chunk["choices"][0]
            if c.get("text"):
                n += 1
                yield c["text"]
            if c.get("finish_reason"):
                finish = c["finish_reason"]
            if should_stop():
                finish = "length"
                break
        outcome.completion_tokens = n
        outcome.finish_reason = finish


def load_backend(model, **kw):
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return LlamaCppBackend(p, n_threads=kw.get("threads"))
    if p.is_dir():
        return TransformersBackend(p, device=kw.get("device", "auto"))
    raise UserError(f"{p}: give a merged model folder or a .gguf file")
