"""Generation and interactive chat with a merged (or adapter) model, using the model's own template.

The prompt is rendered by sft.template (the name recorded in the model folder) and tokenized alone,
BOS included, exactly as sft.data tokenizes training prompts, so serving sees what training taught.
Presets: paper = the paper's decoding (temperature 0.2, top-k 40, top-p 0.9, repetition penalty 1.1,
the later value); paper-1.3 = the same with the early 1.3 penalty; hf = transformers' defaults with
sampling; greedy = deterministic argmax (tests, reproducible demos).
"""
from __future__ import annotations

import sys
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

    from sft.template import load_name
    from zhllama.models import check_sizes, load_adapter_chain, load_model_dir, load_tokenizer

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: no such model folder")
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer.model").is_file():
        raise UserError(f"{d}: no tokenizer (tokenizer.json) in the model folder; `sft merge` copies it there")
    tok = load_tokenizer(d)
    td = getattr(torch, dtype)
    if (d / "adapter_config.json").is_file():
        # the adapter's recorded chain (parents + base), checked by hash; --base must be the recorded weights
        model, _ = load_adapter_chain(base, [d], dtype=td, log=lambda m: print(m, file=sys.stderr))
    else:
        model = load_model_dir(d, dtype=td)
    check_sizes(model, d, len(tok), d)
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


class _StopFlag:
    """A StoppingCriteria that ends generation after the current token once `flag` is set (by Ctrl-C in chat)."""

    def __init__(self, flag):
        self.flag = flag

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool)


def generate(model, tok, prompt_text: str, preset: str = "paper", max_new_tokens: int = 400,
             seed: int | None = 0, stream: bool = False, stop=None, details: dict | None = None) -> str:
    """Continue an already rendered prompt; returns the decoded new text only.

    `stop`: a threading.Event; once set, generation ends after the current token (the text so far is returned).
    `details`: a dict that receives "token_ids" (the new ids) and "raw" (their text with special tokens kept: a
    model that emits <s> or </s> mid-answer shows it there, while the answer drops them).
    """
    import torch
    from transformers import StoppingCriteriaList, TextStreamer

    if seed is not None:
        torch.manual_seed(seed)
    ids = torch.tensor([tok(prompt_text)["input_ids"]])
    kw = generation_kwargs(tok, preset, max_new_tokens)
    if stream:
        kw["streamer"] = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    if stop is not None:
        kw["stopping_criteria"] = StoppingCriteriaList([_StopFlag(stop)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    new = out[0, ids.shape[1]:]
    if details is not None:
        details["token_ids"] = new.tolist()
        details["raw"] = tok.decode(new, skip_special_tokens=False)
    return tok.decode(new, skip_special_tokens=True)


def answer(model, tok, template: str, instruction: str, input: str = "", **kw) -> str:
    from sft.template import get

    return generate(model, tok, get(template).render(instruction, input), **kw)


CHAT_HELP = """commands:
  /help            this list
  /reset           forget the conversation so far
  /quit, /exit     leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while an answer is being written stops that answer and returns to the prompt.
Older turns are dropped when the conversation no longer fits --context tokens."""
MIN_ANSWER_TOKENS = 16


class TooLong(UserError):
    """A single message that cannot fit the context even without history."""


def fit_prompt(tok, template, history: list, message: str, max_new_tokens: int, context: int):
    """(prompt, answer budget, turns dropped): the oldest turns go first; then the answer budget shrinks to what is
    left, down to MIN_ANSWER_TOKENS; a message that leaves less than that is refused (TooLong)."""
    dropped = 0
    prompt = template.render_conversation(history, message)
    n = len(tok(prompt)["input_ids"])
    while history and n + max_new_tokens > context:
        history.pop(0)
        dropped += 1
        prompt = template.render_conversation(history, message)
        n = len(tok(prompt)["input_ids"])
    budget = min(max_new_tokens, context - n)
    if budget < min(MIN_ANSWER_TOKENS, max_new_tokens):
        raise TooLong(f"this message is {n:,} tokens with the template; with --context {context:,} that leaves "
                      f"{max(0, context - n)} for the answer (need {min(MIN_ANSWER_TOKENS, max_new_tokens)}): "
                      "shorten it or raise --context")
    return prompt, budget, dropped


def terminal_input(prompt: str) -> str:
    """input() for a terminal that a Ctrl-C always interrupts.

    A terminal's SIGINT goes to any thread of the process that does not block it; when a library thread takes
    it, a main thread asleep in input() never wakes to raise KeyboardInterrupt. Waking every 0.2 s lets Python
    run the pending handler in the main thread whichever thread the kernel chose. A terminal in canonical mode
    makes stdin readable only once a whole line (or Ctrl-D) is typed, so the line is then read at once.
    """
    import select
    import sys

    sys.stdout.write(prompt)
    sys.stdout.flush()
    while not select.select([sys.stdin], [], [], 0.2)[0]:
        pass
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def chat(model, tok, template: str, preset: str = "paper", max_new_tokens: int = 400, context: int = 2048,
         read=input, write=print) -> list[tuple[str, str]]:
    """Multi-turn loop: turns are concatenated in the template; oldest turns are dropped past `context` tokens.

    Ctrl-C during an answer stops it (the partial answer is not kept in the history) and returns to the prompt;
    Ctrl-C or Ctrl-D at the prompt ends the chat normally.
    """
    import signal
    import threading

    from sft.template import get

    t = get(template)
    history: list[tuple[str, str]] = []
    write(f"chat ({template} template, preset {preset}, context {context:,} tokens); /help lists the commands")
    while True:
        try:
            q = read("user> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        q = q.strip()
        if not q:
            continue
        if q in ("/quit", "/exit"):
            break
        if q == "/help":
            write(CHAT_HELP)
            continue
        if q == "/reset":
            history.clear()
            write("(history cleared)")
            continue
        if q.startswith("/") and " " not in q:
            write(f"unknown command {q}; /help lists the commands")
            continue
        try:
            prompt, budget, dropped = fit_prompt(tok, t, history, q, max_new_tokens, context)
        except TooLong as e:
            write(f"(not sent: {e})")
            continue
        if dropped:
            write(f"(the {dropped} oldest turn(s) no longer fit --context {context:,} and were dropped)")
        if budget < max_new_tokens:
            write(f"(answer limited to {budget} tokens by --context {context:,})")
        write("assistant> ", end="", flush=True) if write is print else write("assistant> ")
        stop = threading.Event()
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if on_main else None
        try:
            a = generate(model, tok, prompt, preset=preset, max_new_tokens=budget, seed=None, stream=True, stop=stop)
        finally:
            if on_main:
                signal.signal(signal.SIGINT, previous)
        if stop.is_set():
            write("\n(stopped; this answer is not kept in the conversation)")
            continue
        history.append((q, a.strip()))
    return history
