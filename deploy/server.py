"""`deploy serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and the browser chat page.

Endpoints: GET /v1/models, POST /v1/chat/completions (streamed by server-sent events, or not),
POST /v1/completions (raw prompt, no template), GET / (the chat page), GET /health.
Decoding defaults to the paper's preset (sft.generate.PRESETS["paper"]); request fields override it
(temperature 0 = greedy; zhllama extensions: "preset", "top_k", "repetition_penalty").

Safe by default: binds 127.0.0.1; an optional API key (Bearer); JSON bodies only (415 otherwise, so a
web page on another site cannot make the browser post to it); request bodies over --max-body bytes
get 413; prompts over --max-prompt-tokens and max_tokens over --max-tokens get a 400 that says so
(never a silent truncation); more than --max-queue requests waiting or running get 429; a request
stops generating after --timeout seconds. One generation runs at a time (the model is not shared
between threads); the others wait their turn in arrival order.
"""

import asyncio
import json
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import UserError

PAGE = Path(__file__).resolve().parent / "web" / "chat.html"


@dataclass
class Limits:
    max_tokens: int = 512           # cap on a request's max_tokens (and its default)
    max_prompt_tokens: int = 1536
    max_body: int = 256 * 1024      # bytes
    max_queue: int = 8              # requests waiting or running
    timeout: float = 120.0          # seconds per request, waiting included


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def sampling_from(body: dict, limits: Limits):
    from deploy.backends import Sampling
    from sft.generate import PRESETS

    preset = body.get("preset", "paper")
    if preset not in PRESETS:
        raise ApiError(400, f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", "preset")
    p = dict(PRESETS[preset])
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is None:
        mt = limits.max_tokens
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise ApiError(400, "max_tokens must be a positive integer", "max_tokens")
    if mt > limits.max_tokens:
        raise ApiError(400, f"max_tokens {mt} is over this server's cap of {limits.max_tokens}", "max_tokens")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", "n")

    def num(key, lo, hi):
        v = body.get(key)
        if v is None:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
            raise ApiError(400, f"{key} must be a number in [{lo}, {hi}]", key)
        return v

    t, tp, tk, rp = num("temperature", 0, 2), num("top_p", 0, 1), num("top_k", 0, 1000), num("repetition_penalty", 0.5, 2)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "seed must be an integer", "seed")
    do_sample = p["do_sample"]
    if t is not None:
        do_sample = t > 0
    return Sampling(max_tokens=mt, do_sample=do_sample,
                    temperature=t if t else p.get("temperature", 1.0),
                    top_p=tp if tp is not None else p.get("top_p", 1.0),
                    top_k=int(tk) if tk is not None else p.get("top_k", 0),
                    repetition_penalty=rp if rp is not None else p.get("repetition_penalty", 1.0),
                    seed=seed)


def create_app(backend, limits: Limits | None = None, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    from deploy.backends import Outcome
    from sft.template import check_messages

    limits = limits or Limits()
    app = FastAPI(title="zhllama", docs_url=None, redoc_url=None, openapi_url=None)
    gate = asyncio.Lock()                 # one generation at a time
    state = {"pending": 0, "finished": 0, "refused": 0}

    def err(e: ApiError):
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}},
                            status_code=e.status)

    def check_key(request: Request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error")

    async def read_json(request: Request) -> dict:
        # JSON only: a cross-site page cannot send it without a CORS preflight, which this server never allows
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "Content-Type must be application/json")
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > limits.max_body:
            raise ApiError(413, f"request body of {n} bytes is over the {limits.max_body}-byte limit")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limits.max_body:
                raise ApiError(413, f"request body is over the {limits.max_body}-byte limit")
        try:
            body = json.loads(buf)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        return body

    def check_prompt(ids):
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt is {len(ids)} tokens, over this server's limit of {limits.max_prompt_tokens}; "
                                "shorten it or drop earlier turns", "messages", kind="context_length_exceeded")

    async def run(ids, s):
        """Async iterator of text pieces, then the Outcome; waits for the model, honours the deadline."""
        deadline = time.monotonic() + limits.timeout
        try:
            await asyncio.wait_for(gate.acquire(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(503, f"timed out after {limits.timeout:g} s waiting for the model", kind="timeout") from None
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        outcome = Outcome()

        def should_stop():
            return cancel.is_set() or time.monotonic() > deadline

        def work():
            try:
                for piece in backend.stream(ids, s, should_stop, outcome):
                    loop.call_soon_threadsafe(q.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(q.put_nowait, ("done", outcome))
            except BaseException as e:
                loop.call_soon_threadsafe(q.put_nowait, ("error", e))

        th = threading.Thread(target=work, daemon=True)
        th.start()
        try:
            while True:
                kind, v = await q.get()
                if kind == "piece":
                    yield v
                elif kind == "done":
                    if time.monotonic() > deadline:
                        v.finish_reason = "length"
                    yield v
                    return
                else:
                    raise v
        finally:
            cancel.set()
            await asyncio.to_thread(th.join)
            gate.release()

    async def admit(request: Request):
        check_key(request)
        if state["pending"] >= limits.max_queue:
            state["refused"] += 1
            raise ApiError(429, f"server busy: {state['pending']} requests queued (limit {limits.max_queue}); retry later",
                           kind="rate_limit_error")
        state["pending"] += 1

    def release():
        state["pending"] -= 1
        state["finished"] += 1

    async def respond(request: Request, chat: bool):
        try:
            await admit(request)
        except ApiError as e:
            return err(e)
        streaming = False
        try:
            body = await read_json(request)
            s = sampling_from(body, limits)
            if chat:
                try:
                    msgs = check_messages(body.get("messages"))
                except UserError as e:
                    raise ApiError(400, str(e), "messages") from None
                if msgs[-1]["role"] != "user":
                    raise ApiError(400, "the last message must be from the user", "messages")
                ids = await asyncio.to_thread(backend.chat_ids, msgs)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str) or not prompt:
                    raise ApiError(400, "prompt must be a non-empty string", "prompt")
                ids = await asyncio.to_thread(backend.text_ids, prompt)
            check_prompt(ids)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            created = int(time.time())
            obj = "chat.completion" if chat else "text_completion"
            if body.get("stream"):
                streaming = True
                done = []

                def release_once():
                    if not done:
                        done.append(1)
                        release()

                gen = sse(ids, s, rid, created, chat, release_once)
                # a client gone before the stream starts never runs the generator's `finally`: its slot is
                # freed when the generator is collected
                weakref.finalize(gen, release_once)
                return StreamingResponse(gen, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, outcome = [], None
            async for v in run(ids, s):
                if isinstance(v, str):
                    text.append(v)
                else:
                    outcome = v
            content = "".join(text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": content}} if chat
                      else {"index": 0, "text": content, "logprobs": None})
            choice["finish_reason"] = outcome.finish_reason
            return {"id": rid, "object": obj, "created": created, "model": backend.name, "choices": [choice],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": outcome.completion_tokens,
                              "total_tokens": len(ids) + outcome.completion_tokens}}
        except ApiError as e:
            return err(e)
        except UserError as e:
            return err(ApiError(400, str(e)))
        finally:
            if not streaming:
                release()

    async def sse(ids, s, rid, created, chat, done):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta=None, text=None, finish=None):
            c = {"index": 0, "finish_reason": finish}
            if chat:
                c["delta"] = delta if delta is not None else {}
            else:
                c.update(text=text or "", logprobs=None)
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": backend.name,
                                          "choices": [c]}, ensure_ascii=False) + "\n\n"

        try:
            if chat:
                yield chunk(delta={"role": "assistant", "content": ""})
            async for v in run(ids, s):
                if isinstance(v, str):
                    if v:
                        yield chunk(delta={"content": v}, text=v)
                else:
                    yield chunk(finish=v.finish_reason)
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind, "code": e.status}}) + "\n\n"
        finally:
            done()

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as e:
            return err(e)
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "created": 0, "owned_by": "zhllama"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.name, **state}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    app.state.counters = state
    return app


def serve(model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, limits: Limits | None = None,
          device: str = "auto", log=print):
    import uvicorn

    from deploy.backends import load_backend

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
    backend = load_backend(model, device=device)
    app = create_app(backend, limits, api_key)
    log(f"serving {backend.name} on http://{host}:{port} (OpenAI API under /v1, chat page at /)")
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=None, timeout_keep_alive=5)
