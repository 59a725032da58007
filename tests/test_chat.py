"""`sft chat` behaves like a chat: Ctrl-C stops an answer (under a real pty), Ctrl-C/Ctrl-D at the prompt exit 0,
--context drops old turns and refuses a message that cannot fit, a model without a template record is warned about."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT

LONG = 1500  # tokens every answer is forced to take (min_new_tokens), so Ctrl-C lands while it is written


@pytest.fixture(scope="module")
def chat_model(tiny_base, tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from zhllama.chat import save_name
    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model

    d = tmp_path_factory.mktemp("chat") / "merged"
    save_tokenizer_folder(load_model(tiny_base), d)
    n = len(AutoTokenizer.from_pretrained(str(d)))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(str(d))
    GenerationConfig(bos_token_id=1, eos_token_id=2, min_new_tokens=LONG).save_pretrained(str(d))
    save_name(d, "chinese-alpaca")
    return d


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", TERM="dumb")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Pty:
    def __init__(self, argv):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the chat, on the pty as its controlling terminal
            os.chdir(ROOT)
            os.execvpe(argv[0], argv, _env())
        self.out = b""
        self.pos = 0  # output before this was matched already

    def expect(self, pattern: bytes, timeout: float = 180) -> bytes:
        import select

        deadline = time.time() + timeout
        start = self.pos
        while time.time() < deadline:
            m = re.search(pattern, self.out[start:])
            if m:
                self.pos = start + m.end()
                return self.out[start:self.pos]
            r, _, _ = select.select([self.fd], [], [], 0.5)
            if r:
                try:
                    self.out += os.read(self.fd, 65536)
                except OSError:
                    break
        raise AssertionError(f"{pattern!r} not seen; output so far:\n{self.out.decode(errors='replace')[-3000:]}")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 60) -> int:
        import select

        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.out += os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError(f"chat did not exit; output:\n{self.out.decode(errors='replace')[-2000:]}")


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_the_next_message_is_answered(chat_model):
    p = Pty([sys.executable, "-m", "sft", "chat", "--model", str(chat_model), "--preset", "greedy",
             "--max-new-tokens", str(LONG)])
    p.expect(rb"user> ")
    p.send(b"first question\r")
    p.expect(rb"assistant> ")
    time.sleep(1.0)
    p.send(b"\x03")  # Ctrl-C: the terminal sends SIGINT to the chat
    p.expect(rb"\(stopped; this answer is not kept")
    p.expect(rb"user> ")
    p.send(b"second question\r")
    p.expect(rb"assistant> ")
    answer = p.expect(rb"user> ", timeout=300)  # the whole forced-length answer, then the prompt again
    assert len(answer.strip()) > 100 and b"stopped" not in answer
    p.send(b"\x03")  # Ctrl-C at the empty prompt: a normal exit
    assert p.wait() == 0
    assert b"Traceback" not in p.out and b"rerun the same command" not in p.out
    assert p.out.count(b"(stopped") == 1


def test_ctrl_d_exits_0_help_lists_commands_and_missing_template_warns(chat_model, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(chat_model, bare)
    (bare / "sft_template.json").unlink()
    (bare / "generation_config.json").unlink()
    r = subprocess.run([sys.executable, "-m", "sft", "chat", "--model", str(bare), "--preset", "greedy",
                        "--max-new-tokens", "4"], input="/help\nhello\n", capture_output=True, text=True,
                       cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]  # end of input = Ctrl-D
    assert "has no sft_template.json" in r.stderr
    for cmd in ("/help", "/reset", "/quit"):
        assert cmd in r.stdout
    assert r.stdout.count("assistant> ") == 1
    h = subprocess.run([sys.executable, "-m", "sft", "chat", "--help"], capture_output=True, text=True, cwd=ROOT,
                       env=_env())
    assert "/reset" in h.stdout and "Ctrl-C" in h.stdout and "--context" in h.stdout


def test_context_drops_old_turns_then_refuses_a_message_that_cannot_fit(chat_model):
    from transformers import AutoTokenizer

    from sft.generate import MIN_ANSWER_TOKENS, TooLong, fit_prompt
    from zhllama.chat import get

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    t = get("chinese-alpaca")
    history = [("q1 " * 20, "a1 " * 20), ("q2 " * 20, "a2 " * 20)]
    one = len(tok(t.render("now"))["input_ids"])
    prompt, budget, dropped = fit_prompt(tok, t, history, "now", 32, one + 32)
    assert (dropped, history, budget) == (2, [], 32) and prompt == t.render("now")
    # no history left to drop: the answer budget shrinks, then the message is refused
    _, budget, _ = fit_prompt(tok, t, [], "now", 64, one + MIN_ANSWER_TOKENS)
    assert budget == MIN_ANSWER_TOKENS
    with pytest.raises(TooLong, match="shorten it or raise --context"):
        fit_prompt(tok, t, [], "now " * 300, 64, 256)
    from sft.generate import chat, load

    model, tok2, tname = load(chat_model)
    outs = []
    inputs = iter(["now " * 300, "/quit"])
    hist = chat(model, tok2, tname, preset="greedy", max_new_tokens=8, context=256, read=lambda _: next(inputs),
                write=lambda *a, **k: outs.append(" ".join(map(str, a))))
    assert hist == [] and any("not sent" in o for o in outs)


def test_earlier_turns_are_kept_and_the_answer_gets_what_the_context_leaves(chat_model):
    """Issue 24: with --max-new-tokens equal to the context (the default model: 512 and 512), reserving the whole
    answer budget dropped every earlier turn. Turns now go only when the prompt leaves under MIN_ANSWER_TOKENS."""
    from transformers import AutoTokenizer

    from zhllama.chat import get
    from zhllama.chat.context import MIN_ANSWER_TOKENS, fit_prompt

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    t = get("chinese-alpaca")
    turns = [("q1 " * 10, "a1 " * 10), ("q2 " * 10, "a2 " * 10)]
    both = len(tok(t.render_conversation(turns, "now"))["input_ids"])
    last = len(tok(t.render_conversation(turns[1:], "now"))["input_ids"])
    assert both > last > len(tok(t.render("now"))["input_ids"])
    history = list(turns)
    prompt, budget, dropped = fit_prompt(tok, t, history, "now", 512, 512)
    assert (dropped, history, budget) == (0, turns, 512 - both) and prompt == t.render_conversation(turns, "now")
    # the boundary, token-exact: both turns stay while they leave MIN_ANSWER_TOKENS, one token less drops the oldest
    history = list(turns)
    assert fit_prompt(tok, t, history, "now", 512, both + MIN_ANSWER_TOKENS)[1:] == (MIN_ANSWER_TOKENS, 0)
    history = list(turns)
    prompt, budget, dropped = fit_prompt(tok, t, history, "now", 512, both + MIN_ANSWER_TOKENS - 1)
    assert (dropped, history, budget) == (1, turns[1:], both + MIN_ANSWER_TOKENS - 1 - last)
    assert prompt == t.render_conversation(turns[1:], "now")


def test_chat_sends_earlier_turns_with_a_clipped_answer_budget(chat_model, tmp_path, monkeypatch):
    """The chat loop itself, on the tiny model with the default model's numbers (--max-new-tokens 512, context 512):
    the second question is sent after the first turn, and generation gets exactly the tokens the prompt leaves."""
    import torch

    import sft.generate as g
    from zhllama.chat import get

    model_dir = tmp_path / "m"
    shutil.copytree(chat_model, model_dir)
    (model_dir / "generation_config.json").unlink()  # no forced answer length
    model, tok, tname = g.load(model_dir)
    # a model that answers briefly, as a tuned one does: its LM head always prefers EOS (the random one never ends)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 1.0
    model.lm_head = head
    calls = []
    real = g.generate

    def recording(model, tok, prompt, **kw):
        calls.append((prompt, kw["max_new_tokens"]))
        return real(model, tok, prompt, **kw)

    monkeypatch.setattr(g, "generate", recording)
    outs = []
    inputs = iter(["first question", "second question", "/quit"])
    hist = g.chat(model, tok, tname, preset="greedy", max_new_tokens=512, context=512,
                  read=lambda _: next(inputs), write=lambda *a, **k: outs.append(" ".join(map(str, a))))
    t = get(tname)
    assert hist == [("first question", ""), ("second question", "")]
    first, second = t.render("first question"), t.render_conversation(hist[:1], "second question")
    assert calls == [(first, 512 - len(tok(first)["input_ids"])), (second, 512 - len(tok(second)["input_ids"]))]
    assert not any("dropped" in o for o in outs)


def test_ctrl_c_during_an_answer_prints_one_stop_notice_and_the_chat_goes_on(chat_model, monkeypatch):
    """Issue 24: one Ctrl-C outcome per answer. A Ctrl-C (or two) during an answer, one while the notice is being
    written, and an interrupt that arrives as KeyboardInterrupt all stop only that answer, with one notice each."""
    import signal

    import sft.generate as g

    answers = iter(["ctrl-c twice", "keyboard interrupt", "kept answer"])

    def fake_generate(model, tok, prompt, stop=None, **kw):
        how = next(answers)
        if how == "ctrl-c twice":
            os.kill(os.getpid(), signal.SIGINT)   # a terminal's Ctrl-C, twice, while the answer is written
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)                      # let Python run the handlers
            assert stop.is_set()
            return "partial"
        if how == "keyboard interrupt":
            raise KeyboardInterrupt
        return how

    monkeypatch.setattr(g, "generate", fake_generate)
    outs = []

    def write(*a, **k):
        text = " ".join(map(str, a))
        outs.append(text)
        if "(stopped" in text and outs.count(text) == 1:
            os.kill(os.getpid(), signal.SIGINT)   # one more Ctrl-C while the notice is written
            time.sleep(0.05)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model))
    inputs = iter(["q1", "q2", "q3", "/quit"])
    before = signal.getsignal(signal.SIGINT)
    try:
        hist = g.chat(None, tok, "chinese-alpaca", preset="greedy", max_new_tokens=8, context=256,
                      read=lambda _: next(inputs), write=write)
    except KeyboardInterrupt:
        pytest.fail(f"a Ctrl-C during an answer ended the chat; output: {outs}")
    assert hist == [("q3", "kept answer")]
    assert sum("(stopped" in o for o in outs) == 2          # one per stopped answer
    assert signal.getsignal(signal.SIGINT) is before     # Ctrl-C at the prompt ends the chat again
