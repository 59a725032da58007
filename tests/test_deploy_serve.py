"""`deploy serve` on 127.0.0.1 with the official openai client: answers equal `sft generate`, limits, load."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
Q = "你好，请介绍一下北京。"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread, on 127.0.0.1 only; stopped by the fixture."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "server did not start in 10 s"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start(backend, **limits):
    from deploy.server import Limits, create_app

    return Running(create_app(backend, Limits(**limits)))


@pytest.fixture(scope="module")
def backend(chat_model):
    from deploy.backends import TransformersBackend

    return TransformersBackend(chat_model, device="cpu")


@pytest.fixture(scope="module")
def server(backend):
    r = start(backend, max_tokens=24, max_prompt_tokens=400, max_body=64 * 1024, max_queue=4, timeout=60)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def sft_answer(chat_model):
    """What `python -m sft generate` prints for Q with greedy decoding."""
    r = subprocess.run([sys.executable, "-m", "sft", "generate", "--model", str(chat_model), "--prompt", Q,
                        "--preset", "greedy", "--max-new-tokens", "16", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]["answer"]


def test_models_lists_the_model(client, backend):
    assert [m.id for m in client.models.list().data] == [backend.name]


def test_chat_answer_equals_sft_generate_plain_and_streamed(client, backend, sft_answer):
    kw = dict(model=backend.name, messages=[{"role": "user", "content": Q}], max_tokens=16, temperature=0,
              extra_body={"preset": "greedy"})
    r = client.chat.completions.create(**kw)
    assert sft_answer and r.choices[0].message.content == sft_answer
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(stream=True, **kw)
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == sft_answer


def test_completions_continue_the_raw_prompt(client, backend, chat_model):
    from sft.generate import generate
    from zhllama.chat import get

    prompt = get("chinese-alpaca").render(Q)
    want = generate(backend.model, backend.tok, prompt, preset="greedy", max_new_tokens=16)
    r = client.completions.create(model=backend.name, prompt=prompt, max_tokens=16, temperature=0,
                                  extra_body={"preset": "greedy"})
    assert r.choices[0].text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=backend.name, prompt=prompt, max_tokens=16, temperature=0, stream=True, extra_body={"preset": "greedy"}))
    assert streamed == want


def test_multiturn_prompt_is_the_models_chat_template(client, backend):
    from sft.generate import generate
    from zhllama.chat import get

    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}, {"role": "user", "content": Q}]
    want = generate(backend.model, backend.tok, get("chinese-alpaca").render_conversation([("你好", "你好！")], Q),
                    preset="greedy", max_new_tokens=12)
    r = client.chat.completions.create(model=backend.name, messages=msgs, max_tokens=12, temperature=0,
                                       extra_body={"preset": "greedy"})
    assert r.choices[0].message.content == want


def test_oversize_and_bad_requests_get_400_or_413(client, server, backend):
    import httpx
    import openai

    with pytest.raises(openai.BadRequestError, match="over this server's cap of 24"):
        client.chat.completions.create(model=backend.name, messages=[{"role": "user", "content": Q}], max_tokens=25)
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 400") as e:
        client.chat.completions.create(model=backend.name, messages=[{"role": "user", "content": "北京" * 300}],
                                       max_tokens=4)
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="expected a assistant message"):
        client.chat.completions.create(model=backend.name, messages=[{"role": "user", "content": "a"},
                                                                     {"role": "user", "content": "b"}])
    big = {"messages": [{"role": "user", "content": "字" * 40_000}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    # what a page on another site can send without a CORS preflight: refused
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps({"messages": [{"role": "user", "content": Q}]}),
                   headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415
    assert httpx.get(server.url + "/health", timeout=10).json()["pending"] == 0


def test_load_16_clients_64_requests_answered_or_429(server, backend):
    """Bounded: every request returns (200 with an answer, or 429) within its timeout; the server lives on."""
    import httpx

    def one(i):
        body = {"messages": [{"role": "user", "content": f"第{i}个问题：{Q}"}], "max_tokens": 8, "temperature": 0,
                "stream": i % 2 == 1}
        with httpx.Client(timeout=60) as c:
            r = c.post(server.url + "/v1/chat/completions", json=body)
            if r.status_code != 200:
                return r.status_code, None
            if body["stream"]:
                events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
                return 200, "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
            return 200, r.json()["choices"][0]["message"]["content"]

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(64)))
    codes = [c for c, _ in results]
    assert len(results) == 64 and set(codes) <= {200, 429}
    assert codes.count(200) >= 4 and codes.count(429) >= 1, codes
    assert all(isinstance(a, str) for c, a in results if c == 200)
    assert time.monotonic() - t0 < 120
    h = httpx.get(server.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["pending"] == 0 and h["refused"] == codes.count(429)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}],
                                                              "max_tokens": 4}, timeout=60)
    assert r.status_code == 200


def test_client_gone_mid_stream_frees_its_slot(server):
    import httpx

    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 24, "stream": True}
    for _ in range(6):   # more than max_queue: a leaked slot would turn the last ones into 429
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    t0 = time.monotonic()
    while httpx.get(server.url + "/health", timeout=10).json()["pending"] and time.monotonic() - t0 < 20:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health", timeout=10).json()["pending"] == 0


def test_api_key_and_timeout(backend):
    import httpx

    from deploy.server import Limits, create_app

    r = Running(create_app(backend, Limits(max_tokens=512, timeout=0.05), api_key="sekret"))
    try:
        body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 512, "temperature": 0,
                "repetition_penalty": 1.0}
        assert httpx.post(r.url + "/v1/chat/completions", json=body, timeout=30).status_code == 401
        assert httpx.get(r.url + "/v1/models", timeout=30).status_code == 401
        h = {"Authorization": "Bearer sekret"}
        t0 = time.monotonic()
        res = httpx.post(r.url + "/v1/chat/completions", json=body, headers=h, timeout=30)
        # the deadline stops generation early: fewer than 512 tokens, well before 512 steps would take
        assert res.status_code == 200 and time.monotonic() - t0 < 10
        j = res.json()
        assert j["choices"][0]["finish_reason"] in ("length", "stop") and j["usage"]["completion_tokens"] < 512
    finally:
        r.stop()


def test_serve_refuses_pickled_weights_and_adapters(chat_model, tmp_path):
    import shutil

    from deploy.backends import TransformersBackend
    from zhllama.errors import UserError

    d = tmp_path / "m"
    shutil.copytree(chat_model, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(UserError, match="no .safetensors weights"):
        TransformersBackend(d)
    (d / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="is a PEFT adapter"):
        TransformersBackend(d)
