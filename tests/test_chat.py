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
