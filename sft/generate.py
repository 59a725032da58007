"""Generation and interactive chat with a merged (or adapter) model, using the model's own template.

The prompt is rendered by zhllama.chat (the name recorded in the model folder) and tokenized alone,
BOS included, exactly as sft.data tokenizes training prompts, so serving sees what training taught.
Presets: paper = the paper's decoding (temperature 0.2, top-k 40, top-p 0.9, repetition penalty 1.1,
the later value); paper-1.3 = the same with the early 1.3 penalty; hf = transformers' defaults with
sampling; greedy = deterministic argmax (tests, reproducible demos).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from zhllama.chat.context import MIN_ANSWER_TOKENS, TooLong, fit_prompt  # noqa: F401  (public here too)
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

    from zhllama.chat import load_name
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


def generate(model, tok, prompt_text: str, preset: str = "paper", max_new_tokens: int = 400,
             seed: int | None = 0, stream: bool = False, stop=None, details: dict | None = None) -> str:
    """Continue an already rendered prompt; returns the decoded new text only.

    `stop`: a threading.Event; once set, generation ends after the current token (the text so far is returned).
    `details`: a dict that receives "token_ids" (the new ids) and "raw" (their text with special tokens kept: a
    model that emits <s> or </s> mid-answer shows it there, while the answer drops them).
    """
    import torch
    from transformers import StoppingCriteriaList, TextStreamer

    from zhllama.chat.stops import StopWhen

    if seed is not None:
        torch.manual_seed(seed)
    ids = torch.tensor([tok(prompt_text)["input_ids"]])
    kw = generation_kwargs(tok, preset, max_new_tokens)
    if stream:
        kw["streamer"] = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    if stop is not None:
        kw["stopping_criteria"] = StoppingCriteriaList([StopWhen(stop.is_set)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    new = out[0, ids.shape[1]:]
    if details is not None:
        details["token_ids"] = new.tolist()
        details["raw"] = tok.decode(new, skip_special_tokens=False)
    return tok.decode(new, skip_special_tokens=True)


def answer(model, tok, template: str, instruction: str, input: str = "", **kw) -> str:
    from zhllama.chat import get

    return generate(model, tok, get(template).render(instruction, input), **kw)


CHAT_HELP = """commands:
  /help            this list
  /reset           forget the conversation so far
  /quit, /exit     leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C while an answer is being written stops that answer and returns to the prompt.
Earlier turns stay in the conversation while they fit --context tokens (an answer gets the tokens left);
the oldest are dropped only when too little would be left for an answer."""
STOPPED = "(stopped; this answer is not kept in the conversation)"


@contextlib.contextmanager
def ctrl_c_sets(stop):
    """Within the block, Ctrl-C sets `stop` (the answer ends after its current token) instead of raising, however
    often it is pressed. Off the main thread no handler can be installed, and the block is left as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    """Multi-turn loop: turns are concatenated in the template and kept while they fit `context` tokens
    (zhllama.chat.context.fit_prompt: the answer gets what the prompt leaves, up to max_new_tokens).

    Ctrl-C during an answer stops it (the partial answer is not kept in the history) and returns to the prompt;
    Ctrl-C or Ctrl-D at the prompt ends the chat normally.
    """
    import threading

    from zhllama.chat import get

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
        # one answer, one stop notice: the notice is written while Ctrl-C still only sets the flag, so a second
        # Ctrl-C then neither ends the chat nor stops anything again
        with ctrl_c_sets(stop):
            try:
                a = generate(model, tok, prompt, preset=preset, max_new_tokens=budget, seed=None, stream=True,
                             stop=stop)
            except KeyboardInterrupt:   # an interrupt that arrived as an exception still only ends this answer
                stop.set()
            if stop.is_set():
                write("\n" + STOPPED)
                continue
        history.append((q, a.strip()))
    return history
