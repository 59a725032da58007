"""`deploy serve` against hostile clients: dropped streams, clients that leave while queued or while
their answer is generated, stalled bodies and heads, foreign Host headers, hostile JSON and sampling
values, concurrent clients. Real uvicorn (with `serve`'s settings) on 127.0.0.1, the tiny chat model.

Every HTTP status seen is recorded; the last test asserts that none was a 500. Every streamed answer
read here is checked to end with `data: [DONE]` or an error event.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

Q = "你好，请介绍一下北京。"
CHAT = "/v1/chat/completions"
STATUSES: list[int] = []          # every status this suite received, for the no-500 check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """create_app + the uvicorn settings `deploy serve` uses (deploy.transport), in a thread, loopback only."""

    def __init__(self, backend, api_key=None, allowed_hosts=None, **limits):
        import uvicorn

        from deploy.server import Limits, create_app
        from deploy.transport import uvicorn_config

        self.limits = Limits(**limits)
        self.port = free_port()
        self.app = create_app(backend, self.limits, api_key, allowed_hosts)
        self.server = uvicorn.Server(uvicorn_config(self.app, "127.0.0.1", self.port, self.limits))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        assert self.server.started, "server did not start in 20 s"
        self.url = f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_health(self, cond, timeout: float) -> float:
        """Seconds until cond(/health) holds; fails after `timeout`."""
        t0 = time.monotonic()
        while True:
            h = self.health()
            if cond(h):
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {h}"
            time.sleep(0.02)

    def released_within(self, t0: float) -> float:
        """Seconds from `t0` (time.monotonic(), the same clock: the server runs in this process) until the
        model was released, once /health says nothing is generating or waiting."""
        self.wait_health(lambda h: h["generating"] == 0 and h["pending"] == 0, timeout=10)
        return self.app.state.runner.released_at - t0

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=15)


class Paced:
    """The real backend, each generated token taking at least `delay` s longer, as on a bigger model:
    the stop callback runs once per token in the generation thread. So that a long answer is really
    still running when a test looks at it, on a fast machine too."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stream(self, ids, s, should_stop, outcome):
        def slow():
            time.sleep(self.delay)
            return should_stop()

        return self.inner.stream(ids, s, slow, outcome)


def post(srv, body, path=CHAT, raw: bytes | None = None, headers=None, timeout=60):
    import httpx

    h = {"Content-Type": "application/json", **(headers or {})}
    r = httpx.post(srv.url + path, content=raw if raw is not None else json.dumps(body), headers=h, timeout=timeout)
    STATUSES.append(r.status_code)
    return r


def stream(srv, body, path=CHAT, timeout=60):
    """(status, parsed events) of a streamed answer; a 200 stream must end with [DONE] or an error event."""
    import httpx

    with httpx.stream("POST", srv.url + path, json=dict(body, stream=True), timeout=timeout) as r:
        STATUSES.append(r.status_code)
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()
        data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert data, "empty stream"
    if data[-1] == "[DONE]":
        return 200, [json.loads(d) for d in data[:-1]]
    last = json.loads(data[-1])
    assert "error" in last, f"stream cut without [DONE] or an error event: {data[-3:]}"
    return 200, [json.loads(d) for d in data]


def request_bytes(port, body: bytes, path=CHAT, length: int | None = None, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


def connect(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    return s


def open_stream(srv, body) -> socket.socket:
    """A streamed request on a raw socket, read until its first content event: the answer is generating."""
    s = connect(srv)
    s.sendall(request_bytes(srv.port, json.dumps(dict(body, stream=True)).encode()))
    got = b""
    while got.count(b"data: ") < 2:
        chunk = s.recv(65536)
        assert chunk, f"server closed the stream early: {got[:300]!r}"
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    return s


def closed_by_peer(s: socket.socket, timeout: float) -> bytes | None:
    """Everything the server sent until it closed the connection, or None if it was still open after `timeout`."""
    s.settimeout(0.2)
    got, t0 = b"", time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    return None


LONG = {"messages": [{"role": "user", "content": Q}], "max_tokens": 400, "temperature": 0}
SHORT = {"messages": [{"role": "user", "content": Q}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def backend(chat_model):
    from deploy.backends import TransformersBackend

    return TransformersBackend(chat_model, device="cpu")


@pytest.fixture(scope="module")
def srv(backend):
    r = Server(backend, max_tokens=32, max_prompt_tokens=400, max_body=64 * 1024, max_queue=8, timeout=60)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def paced(backend):
    """Long answers (0.02 s more per token: 400 tokens >= 8 s), 12 stalled clients may hold their bodies 30 s."""
    r = Server(Paced(backend, 0.02), max_tokens=400, max_queue=8, timeout=60, body_timeout=30, head_timeout=30)
    yield r
    r.stop()


# ---------------------------------------------------------------------------------------------- clients that leave

def test_dropped_streams_release_the_model_within_a_second(paced):
    for _ in range(3):
        s = open_stream(paced, LONG)
        assert paced.health()["generating"] == 1
        t0 = time.monotonic()
        s.close()
        # the generation is cancelled and the model free within a second (the bound)
        assert 0 < paced.released_within(t0) < 1.0
    t0 = time.monotonic()
    status, events = stream(paced, SHORT, timeout=10)
    assert status == 200 and events[-1]["choices"][0]["finish_reason"] == "length"
    r = post(paced, SHORT, timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - t0 < 10


def test_client_gone_mid_answer_stops_its_generation(paced):
    s = connect(paced)
    s.sendall(request_bytes(paced.port, json.dumps(LONG).encode()))   # not streamed: nothing comes back until done
    paced.wait_health(lambda h: h["generating"] == 1, timeout=10)
    t0 = time.monotonic()
    s.close()
    assert 0 < paced.released_within(t0) < 1.0
    assert post(paced, SHORT, timeout=10).status_code == 200


def test_queued_requests_whose_clients_left_are_dropped(paced):
    a = open_stream(paced, LONG)                      # holds the model for >= 8 s
    queued = []
    for streamed in (False, True):                    # one plain, one streamed request wait behind it
        s = connect(paced)
        s.sendall(request_bytes(paced.port, json.dumps(dict(LONG, stream=streamed)).encode()))
        queued.append(s)
    paced.wait_health(lambda h: h["pending"] == 3, timeout=10)
    for s in queued:
        s.close()
    # both leave the line while the first answer is still being generated
    paced.wait_health(lambda h: h["pending"] == 1, timeout=3)
    assert paced.health()["generating"] == 1
    a.close()
    paced.wait_health(lambda h: h["generating"] == 0 and h["pending"] == 0, timeout=5)
    assert post(paced, SHORT, timeout=10).status_code == 200


# ------------------------------------------------------------------------------------------------ stalled clients

def test_after_3_dropped_streams_and_with_12_stalled_clients_a_request_is_answered(paced):
    for _ in range(3):
        open_stream(paced, LONG).close()
    stalled = []
    body = json.dumps(SHORT).encode()
    for i in range(12):
        s = connect(paced)
        if i % 3 == 0:   # half a request head
            s.sendall(request_bytes(paced.port, body)[:40])
        else:            # the whole head and half the body
            s.sendall(request_bytes(paced.port, body[: len(body) // 2], length=len(body)))
        stalled.append(s)
    try:
        t0 = time.monotonic()
        r = post(paced, SHORT, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        status, events = stream(paced, SHORT, timeout=10)
        assert status == 200 and events
        assert time.monotonic() - t0 < 10
        h = paced.health()
        assert h["pending"] == 0 and h["generating"] == 0   # half-read requests are not queued
        for s in stalled:                                   # and they still hold their connections
            assert closed_by_peer(s, 0.05) is None
    finally:
        for s in stalled:
            s.close()


def test_slow_body_gets_408_and_slow_head_is_closed(backend):
    srv = Server(backend, max_tokens=8, body_timeout=1, head_timeout=1)
    try:
        body = json.dumps(SHORT).encode()
        s = connect(srv)
        s.sendall(request_bytes(srv.port, body[:10], length=len(body)))
        got = closed_by_peer(s, 10)
        assert got is not None and got.startswith(b"HTTP/1.1 408"), got
        assert b"not received within 1 s" in got
        STATUSES.append(408)
        s.close()
        s = connect(srv)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert closed_by_peer(s, 10) == b""
        s.close()
        assert srv.health()["pending"] == 0
        assert post(srv, SHORT).status_code == 200
    finally:
        srv.stop()


def test_connection_limit_answers_503_then_recovers(backend):
    srv = Server(backend, max_tokens=8, max_connections=4, head_timeout=1.5)
    try:
        held = [connect(srv) for _ in range(4)]
        for s in held:
            s.sendall(b"GET /health HTTP/1.1\r\n")       # heads never finished
        time.sleep(0.3)
        assert post(srv, SHORT).status_code == 503        # uvicorn's limit_concurrency, not a hang
        for s in held:
            assert closed_by_peer(s, 10) == b""          # cut at the head deadline
            s.close()
        assert post(srv, SHORT).status_code == 200
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ hosts and keys

def test_foreign_host_header_is_refused(srv):
    import httpx

    for host, want in [("evil.example", 400), (f"evil.example:{srv.port}", 400), ("127.0.0.1.evil.example", 400),
                       (f"localhost:{srv.port}", 200), ("127.0.0.1", 200), (f"[::1]:{srv.port}", 200)]:
        r = httpx.get(srv.url + "/v1/models", headers={"Host": host}, timeout=10)
        STATUSES.append(r.status_code)
        assert r.status_code == want, host
    r = post(srv, SHORT, headers={"Host": "evil.example"})
    assert r.status_code == 400 and srv.health()["finished"] >= 0


def test_allowed_hosts_and_binding_warning(backend):
    import httpx

    from deploy.server import allowed_hosts_for, binding_warning

    assert allowed_hosts_for("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts_for("0.0.0.0") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts_for("192.168.1.5", ["Chat.Example"]) == ["127.0.0.1", "localhost", "[::1]", "192.168.1.5",
                                                                  "chat.example"]
    assert allowed_hosts_for("::", []) == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts_for("fe80::1") [-1] == "[fe80::1]"
    assert "without --api-key" in binding_warning("0.0.0.0", None)
    assert "without --api-key" in binding_warning("192.168.1.5", "")
    assert binding_warning("0.0.0.0", "k") is None and binding_warning("127.0.0.1", None) is None
    assert binding_warning("localhost", None) is None and binding_warning("::1", None) is None

    srv = Server(backend, api_key="sekret", allowed_hosts=allowed_hosts_for("127.0.0.1", ["chat.example"]))
    try:
        for headers, want in [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "sekret"}, 401),
                              ({"Authorization": "Bearer sekret"}, 200),
                              ({"Authorization": "Bearer sekret", "Host": "chat.example"}, 200),
                              ({"Authorization": "Bearer sekret", "Host": "other.example"}, 400)]:
            r = httpx.get(srv.url + "/v1/models", headers=headers, timeout=10)
            STATUSES.append(r.status_code)
            assert r.status_code == want, headers
        assert post(srv, SHORT).status_code == 401
        assert post(srv, SHORT, headers={"Authorization": "Bearer sekret"}).status_code == 200
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ hostile JSON and values

def _msgs(**kw):
    return json.dumps({"messages": [{"role": "user", "content": Q}], "max_tokens": 4, **kw})


HOSTILE = [  # (id, path, raw body, status, param)
    ("nested-value", CHAT, '{"messages": ' + "[" * 20000 + "]" * 20000 + "}", 400, None),
    ("nested-body", CHAT, "[" * 30000 + "]" * 30000, 400, None),
    ("nested-object", CHAT, '{"a":' * 10000 + "1" + "}" * 10000, 400, None),
    ("null-body", CHAT, "null", 400, None),
    ("list-body", CHAT, "[]", 400, None),
    ("number-body", CHAT, "1", 400, None),
    ("not-json", CHAT, "{not json", 400, None),
    ("lone-surrogate", CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    ("temperature-1e-300", CHAT, _msgs(temperature=1e-300), 400, "temperature"),
    ("temperature-negative", CHAT, _msgs(temperature=-1), 400, "temperature"),
    ("temperature-big", CHAT, _msgs(temperature=2.5), 400, "temperature"),
    ("temperature-string", CHAT, _msgs(temperature="0.5"), 400, "temperature"),
    ("temperature-bool", CHAT, _msgs(temperature=True), 400, "temperature"),
    ("temperature-nan", CHAT, _msgs()[:-1] + ', "temperature": NaN}', 400, "temperature"),
    ("temperature-inf", CHAT, _msgs()[:-1] + ', "temperature": Infinity}', 400, "temperature"),
    ("seed-2**70", CHAT, _msgs(seed=2**70), 400, "seed"),
    ("seed-2**70-stream", CHAT, _msgs(seed=2**70, stream=True), 400, "seed"),
    ("seed-negative", CHAT, _msgs(seed=-1), 400, "seed"),
    ("seed-float", CHAT, _msgs(seed=1.5), 400, "seed"),
    ("top_p", CHAT, _msgs(top_p=1.5), 400, "top_p"),
    ("top_k-float", CHAT, _msgs(top_k=1.5), 400, "top_k"),
    ("top_k-negative", CHAT, _msgs(top_k=-1), 400, "top_k"),
    ("repetition_penalty", CHAT, _msgs(repetition_penalty=0), 400, "repetition_penalty"),
    ("max_tokens-0", CHAT, json.dumps({"messages": [{"role": "user", "content": Q}], "max_tokens": 0}), 400,
     "max_tokens"),
    ("max_tokens-huge", CHAT, json.dumps({"messages": [{"role": "user", "content": Q}], "max_tokens": 2**70}), 400,
     "max_tokens"),
    ("max_tokens-string", CHAT, json.dumps({"messages": [{"role": "user", "content": Q}], "max_tokens": "4"}), 400,
     "max_tokens"),
    ("max_completion_tokens", CHAT, _msgs(max_completion_tokens=-3), 400, "max_completion_tokens"),
    ("n-2", CHAT, _msgs(n=2), 400, "n"),
    ("stream-string", CHAT, _msgs(stream="yes"), 400, "stream"),
    ("stream_options", CHAT, _msgs(stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage"),
    ("stop-5", CHAT, _msgs(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop-empty", CHAT, _msgs(stop=""), 400, "stop"),
    ("stop-number", CHAT, _msgs(stop=3), 400, "stop"),
    ("logprobs", CHAT, _msgs(logprobs=True), 400, "logprobs"),
    ("top_logprobs", CHAT, _msgs(top_logprobs=2), 400, "top_logprobs"),
    ("presence_penalty", CHAT, _msgs(presence_penalty=0.5), 400, "presence_penalty"),
    ("frequency_penalty", CHAT, _msgs(frequency_penalty=9), 400, "frequency_penalty"),
    ("unknown-field", CHAT, _msgs(tools=[{"type": "function"}]), 400, "tools"),
    ("preset", CHAT, _msgs(preset="nope"), 400, "preset"),
    ("messages-missing", CHAT, '{"max_tokens": 4}', 400, "messages"),
    ("messages-empty", CHAT, '{"messages": []}', 400, "messages"),
    ("messages-string", CHAT, '{"messages": "hi"}', 400, "messages"),
    ("message-no-content", CHAT, '{"messages": [{"role": "user"}]}', 400, "messages.0.content"),
    ("message-content-number", CHAT, '{"messages": [{"role": "user", "content": 5}]}', 400, "messages.0.content"),
    ("message-content-parts", CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}',
     400, "messages.0.content"),
    ("message-role", CHAT, '{"messages": [{"role": "tool", "content": "a"}]}', 400, "messages"),
    ("message-last-assistant", CHAT, '{"messages": [{"role": "user", "content": "a"}, '
     '{"role": "assistant", "content": "b"}]}', 400, "messages"),
    ("model-unknown", CHAT, _msgs(model="gpt-4o"), 404, "model"),
    ("prompt-number", "/v1/completions", '{"prompt": 123}', 400, "prompt"),
    ("prompt-list", "/v1/completions", '{"prompt": ["a", "b"]}', 400, "prompt"),
    ("prompt-empty", "/v1/completions", '{"prompt": ""}', 400, "prompt"),
    ("completion-logprobs", "/v1/completions", '{"prompt": "a", "logprobs": 1}', 400, "logprobs"),
    ("completion-echo", "/v1/completions", '{"prompt": "a", "echo": true}', 400, "echo"),
    ("completion-model", "/v1/completions", '{"prompt": "a", "model": "text-davinci-003"}', 404, "model"),
]


@pytest.mark.parametrize("path,raw,status,param", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_a_named_error(srv, path, raw, status, param):
    r = post(srv, None, path=path, raw=raw.encode("utf-8"))
    assert r.status_code == status, r.text[:300]
    e = r.json()["error"]
    assert e["code"] == status and e["message"]
    assert e["param"] == param
    if param:
        assert param.split(".")[0].rstrip("s") in e["message"]


def test_invalid_utf8_body(srv):
    r = post(srv, None, raw=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]


def test_edge_values_that_are_valid_are_served_and_streams_end_with_done(srv, backend):
    for extra in [dict(temperature=0.01, seed=0), dict(seed=2**63 - 1), dict(top_k=0, top_p=0.0, temperature=1.0),
                  dict(model=backend.name, logprobs=False, presence_penalty=0, user="u1"),
                  dict(max_completion_tokens=3, stop=["\u0000"])]:
        body = dict(SHORT, **extra)
        r = post(srv, body)
        assert r.status_code == 200, (extra, r.text[:300])
        status, events = stream(srv, body)
        assert status == 200 and events[-1]["choices"][0]["finish_reason"] in ("stop", "length"), extra
    status, events = stream(srv, dict(SHORT, stream_options={"include_usage": True}))
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


# ---------------------------------------------------------------------------------- sampling semantics honoured

def _greedy(backend, msgs, n, rp=1.0):
    from deploy.backends import Outcome, Sampling

    return "".join(backend.stream(backend.chat_ids(msgs), Sampling(max_tokens=n, do_sample=False,
                                                                   repetition_penalty=rp), lambda: False, Outcome()))


def test_temperature_zero_is_the_greedy_preset(srv, backend):
    msgs = [{"role": "user", "content": Q}]
    want, penalized = _greedy(backend, msgs, 16), _greedy(backend, msgs, 16, rp=1.1)
    assert want != penalized   # so that the comparisons below can tell the paper preset's 1.1 from greedy's 1.0
    for extra in [{}, {"preset": "paper"}]:
        r = post(srv, {"messages": msgs, "max_tokens": 16, "temperature": 0, **extra})
        assert r.json()["choices"][0]["message"]["content"] == want, extra
    # an explicit repetition_penalty still applies
    r = post(srv, {"messages": msgs, "max_tokens": 16, "temperature": 0, "repetition_penalty": 1.1})
    assert r.json()["choices"][0]["message"]["content"] == penalized


def test_stop_strings_cut_the_answer_and_finish_with_stop(srv, backend):
    msgs = [{"role": "user", "content": Q}]
    full = _greedy(backend, msgs, 24)
    stop = full[6:9]
    cut = full[:full.index(stop)]
    assert len(full) > 12 and len(cut) < len(full)
    body = {"messages": msgs, "max_tokens": 24, "temperature": 0}
    for stops in (stop, ["\u0007never\u0007", stop]):
        r = post(srv, dict(body, stop=stops))
        c = r.json()["choices"][0]
        assert (c["message"]["content"], c["finish_reason"]) == (cut, "stop")
        status, events = stream(srv, dict(body, stop=stops))
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert (text, events[-1]["choices"][0]["finish_reason"]) == (cut, "stop")
    # a stop string that never occurs changes nothing
    c = post(srv, dict(body, stop=["\u0007never\u0007"])).json()["choices"][0]
    assert (c["message"]["content"], c["finish_reason"]) == (full, "length")
    # /v1/completions too
    from zhllama.chat import get

    prompt = get("chinese-alpaca").render(Q)
    whole = post(srv, {"prompt": prompt, "max_tokens": 24, "temperature": 0}, path="/v1/completions").json()
    t = whole["choices"][0]["text"]
    r = post(srv, {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": t[5:8]}, path="/v1/completions")
    assert (r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]) == (t[:t.index(t[5:8])], "stop")


def test_stop_text_holds_back_only_possible_starts():
    from deploy.engine import StopText

    st = StopText(["END", "xyz"])
    out = [st.feed(p) for p in ["ab", "cE", "N", "xE", "ND"]]
    assert out == ["ab", "c", "", "ENx", ""] and st.hit   # "EN" then "x" released, stopped at "END"
    st = StopText(["END"])
    assert [st.feed(p) for p in ["aE", "b"]] + [st.flush()] == ["a", "Eb", ""] and not st.hit
    st = StopText(["END"])
    assert st.feed("xxE") == "xx" and st.flush() == "E" and not st.hit


# ---------------------------------------------------------------------------------------------- concurrent clients

def test_concurrent_hostile_and_normal_clients(srv):
    """8 threads, 32 requests: hostile bodies, valid answers (plain and streamed), dropped streams.
    Every one gets 200/400/404/429 and the server is idle and answering afterwards."""
    cases = HOSTILE[8:20] + HOSTILE[-6:]

    def one(i):
        k = i % 4
        if k == 0:
            _, path, raw, status, _ = cases[i % len(cases)]
            return post(srv, None, path=path, raw=raw.encode()).status_code
        if k == 1:
            return post(srv, dict(SHORT, max_tokens=2)).status_code
        if k == 2:
            return stream(srv, dict(SHORT, max_tokens=2))[0]
        s = connect(srv)
        s.sendall(request_bytes(srv.port, json.dumps(dict(SHORT, max_tokens=32, stream=True)).encode()))
        status = int(s.recv(12)[9:12])    # "HTTP/1.1 200": then leave without reading the answer
        s.close()
        STATUSES.append(status)
        return status

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(one, range(32)))
    assert set(codes) <= {200, 400, 404, 429}, codes
    assert codes.count(200) >= 8
    srv.wait_health(lambda h: h["pending"] == 0 and h["generating"] == 0, timeout=10)
    assert post(srv, SHORT).status_code == 200


def test_cli_serve_uses_these_settings(chat_model):
    """`deploy serve`'s command line, through the same path as `python -m deploy serve` (in this process, so
    that it can be stopped): loopback names and --allowed-host answered, other Hosts refused, the key
    required, stalled bodies cut at --body-timeout."""
    import httpx

    from deploy.cli import _parser, serve_kwargs
    from deploy.server import make_server

    port = free_port()
    args = _parser().parse_args(["serve", "--model", str(chat_model), "--port", str(port), "--device", "cpu",
                                 "--api-key", "k", "--allowed-host", "chat.example", "--body-timeout", "1"])
    said = []
    server = make_server(**serve_kwargs(args), log=said.append)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        while not server.started:
            assert time.monotonic() - t0 < 20 and th.is_alive(), "deploy serve did not start"
            time.sleep(0.05)
        url, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
        for headers, want in [(key, 200), ({}, 401), (dict(key, Host="chat.example"), 200),
                              (dict(key, Host="evil.example"), 400), (dict(key, Host=f"localhost:{port}"), 200)]:
            r = httpx.get(url + "/v1/models", headers=headers, timeout=10)
            STATUSES.append(r.status_code)
            assert r.status_code == want, headers
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(request_bytes(port, b'{"messa', length=100, extra="Authorization: Bearer k\r\n"))
        got = closed_by_peer(s, 10)
        assert got is not None and got.startswith(b"HTTP/1.1 408")
        s.close()
    finally:
        server.should_exit = True
        th.join(timeout=15)
    assert said[-1].endswith("answering Host: 127.0.0.1, localhost, [::1], chat.example"), said
    assert not [m for m in said if "warning" in m]


def test_zz_no_500_over_the_hostile_suite():
    """Runs last (file order): no request of this suite got a 500."""
    assert len(STATUSES) >= 90, len(STATUSES)
    assert 500 not in STATUSES and not [s for s in STATUSES if s >= 500 and s != 503], sorted(set(STATUSES))
