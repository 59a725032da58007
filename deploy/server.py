"""`deploy serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and the browser chat page.

Endpoints: GET /v1/models, POST /v1/chat/completions (streamed by server-sent events, or not),
POST /v1/completions (raw prompt, no template), GET / (the chat page), GET /health.
Decoding defaults to the paper's preset (sft.generate.PRESETS["paper"]); request fields override it
(temperature 0 = the greedy preset; zhllama extensions: "preset", "top_k", "repetition_penalty").
Request fields are validated in deploy.api_schema, the model is shared in deploy.engine, uvicorn's
connection limits are set in deploy.transport.

Safe by default: binds 127.0.0.1; only Host headers naming an allowed host are answered (DNS
rebinding); an optional API key (Bearer); JSON bodies only (415 otherwise, so a web page on another
site cannot make the browser post to it); bodies over --max-body bytes get 413, bodies not received
within --body-timeout seconds 408; requests are queued only once read and validated, and more than
--max-queue waiting or running get 429; a request stops generating after --timeout seconds, and as
soon as its client leaves. One generation runs at a time; the others wait their turn in arrival order.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio

from deploy.api_schema import ApiError, parse, sampling
from zhllama.errors import UserError

PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
log = logging.getLogger("zhllama.serve")


@dataclass
class Limits:
    max_tokens: int = 512           # cap on a request's max_tokens (and its default)
    max_prompt_tokens: int = 1536
    max_body: int = 256 * 1024      # bytes
    max_queue: int = 8              # requests waiting or running
    timeout: float = 120.0          # seconds per request, waiting included
    body_timeout: float = 10.0      # seconds to receive a whole request body
    head_timeout: float = 10.0      # seconds to receive a request's headers
    max_connections: int = 64       # open connections; more get 503 (uvicorn's limit_concurrency)


def sampling_from(body: dict, limits: Limits):
    """Decoding settings from a request body's sampling fields (a dict), validated; ApiError(400) names a
    bad field. The server itself validates whole requests with deploy.api_schema.parse."""
    from deploy.api_schema import ChatRequest

    fields = {k: v for k, v in body.items() if k != "messages" and k in ChatRequest.model_fields}
    fields["messages"] = [{"role": "user", "content": "-"}]
    return sampling(parse(json.dumps(fields).encode(), chat=True), limits.max_tokens)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(host: str, extra=()) -> list[str]:
    """Host headers answered when bound to `host`: loopback names, the bound address (unless it is a
    wildcard such as 0.0.0.0, which names no host), and `extra` ("*" turns the check off)."""
    hosts = list(LOOPBACK_HOSTS)
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        if not ip.is_unspecified:
            hosts.append(f"[{ip}]" if ip.version == 6 else str(ip))
    except ValueError:
        hosts.append(host.lower())
    return list(dict.fromkeys(hosts + [h.lower() for h in extra]))


def binding_warning(host: str, api_key: str | None) -> str | None:
    if is_loopback(host) or api_key:
        return None
    return (f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model "
            "(set --api-key or ZHLLAMA_API_KEY)")


def event_stream(gen, on_close):
    """A server-sent event response whose generator is always closed, and whose queue slot is always
    freed, however the response ends (Starlette leaves a generator suspended at a `yield` when the
    client leaves during a send; its generation would run on to max_tokens)."""
    from fastapi.responses import StreamingResponse

    class EventStream(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                on_close()
                with anyio.CancelScope(shield=True):
                    await gen.aclose()

    return EventStream(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(backend, limits: Limits | None = None, api_key: str | None = None, allowed_hosts=None):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect

    from deploy.engine import ModelRunner
    from zhllama.chat import check_messages

    limits = limits or Limits()
    app = FastAPI(title="zhllama", docs_url=None, redoc_url=None, openapi_url=None)
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends "Host: evil.example"
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS), www_redirect=False)
    runner = ModelRunner(backend)
    state = {"pending": 0, "finished": 0, "refused": 0}

    def err(e: ApiError, close: bool = False):
        return JSONResponse(e.body(), status_code=e.status, headers={"Connection": "close"} if close else None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return err(ApiError(500, f"internal error ({type(e).__name__}); see the server log", kind="server_error"))

    def check_key(request: Request):
        if api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                               f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error")

    async def read_body(request: Request) -> bytes:
        # JSON only: a cross-site page cannot send it without a CORS preflight, which this server never allows
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "Content-Type must be application/json")
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > limits.max_body:
            raise ApiError(413, f"request body of {n} bytes is over the {limits.max_body}-byte limit")
        buf = bytearray()
        try:
            with anyio.fail_after(limits.body_timeout):
                async for chunk in request.stream():
                    buf += chunk
                    if len(buf) > limits.max_body:
                        raise ApiError(413, f"request body is over the {limits.max_body}-byte limit")
        except TimeoutError:
            raise ApiError(408, f"request body not received within {limits.body_timeout:g} s") from None
        except ClientDisconnect:
            raise ApiError(499, "the client closed the connection before sending its whole body") from None
        return bytes(buf)

    async def client_gone(request: Request):
        # the body is read: the next ASGI message is http.disconnect, when the client closes the connection
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def prepare(request: Request, chat: bool):
        """(ids, sampling, request) for a fully read and valid request; ApiError otherwise."""
        check_key(request)
        req = parse(await read_body(request), chat)
        if req.model is not None and req.model != backend.name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server has {backend.name!r}",
                           "model", kind="model_not_found")
        s = sampling(req, limits.max_tokens)
        if chat:
            try:
                msgs = check_messages([m.model_dump(exclude_none=True) for m in req.messages])
            except UserError as e:
                raise ApiError(400, str(e), "messages") from None
            if msgs[-1]["role"] != "user":
                raise ApiError(400, "the last message must be from the user", "messages")
            ids = await asyncio.to_thread(backend.chat_ids, msgs)
        else:
            ids = await asyncio.to_thread(backend.text_ids, req.prompt)
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt is {len(ids)} tokens, over this server's limit of {limits.max_prompt_tokens}; "
                                "shorten it or drop earlier turns", "messages" if chat else "prompt",
                           kind="context_length_exceeded")
        return ids, s, req

    async def respond(request: Request, chat: bool):
        try:
            ids, s, req = await prepare(request, chat)
        except ApiError as e:
            return err(e, close=e.status in (401, 408, 413, 415, 499))   # the body may be unread: end the connection
        except UserError as e:
            return err(ApiError(400, str(e)))
        if state["pending"] >= limits.max_queue:
            state["refused"] += 1
            return err(ApiError(429, f"server busy: {state['pending']} requests queued (limit {limits.max_queue}); "
                                     "retry later", kind="rate_limit_error"))
        state["pending"] += 1
        freed = []

        def free_slot():
            if not freed:
                freed.append(1)
                state["pending"] -= 1
                state["finished"] += 1

        deadline = time.monotonic() + limits.timeout
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return event_stream(sse(ids, s, req.stops(), deadline, rid, created, chat, usage), free_slot)
        try:
            return await answer(request, ids, s, req.stops(), deadline, rid, created, chat)
        except ApiError as e:
            return err(e)
        finally:
            free_slot()

    async def answer(request, ids, s, stops, deadline, rid, created, chat):
        async def collect():
            text, outcome = [], None
            async for v in runner.generate(ids, s, stops, deadline):
                if isinstance(v, str):
                    text.append(v)
                else:
                    outcome = v
            return "".join(text), outcome

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()   # the client left (or the server stops): leave the line, or stop generating
        if work.cancelled() or not work.done():
            return Response(status_code=499)   # nginx's "client closed request"; nobody reads it
        content, outcome = work.result()
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}} if chat
                  else {"index": 0, "text": content, "logprobs": None})
        choice["finish_reason"] = outcome.finish_reason
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": backend.name, "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": outcome.completion_tokens,
                          "total_tokens": len(ids) + outcome.completion_tokens}}

    async def sse(ids, s, stops, deadline, rid, created, chat, usage):
        """Always ends with `data: [DONE]` or an error event, never a cut stream."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, **extra):
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": backend.name,
                                          "choices": choices, **extra}, ensure_ascii=False) + "\n\n"

        def chunk(delta=None, text=None, finish=None):
            c = {"index": 0, "finish_reason": finish}
            if chat:
                c["delta"] = delta if delta is not None else {}
            else:
                c.update(text=text or "", logprobs=None)
            return event([c])

        try:
            if chat:
                yield chunk(delta={"role": "assistant", "content": ""})
            async for v in runner.generate(ids, s, stops, deadline):
                if isinstance(v, str):
                    yield chunk(delta={"content": v}, text=v)
                else:
                    yield chunk(finish=v.finish_reason)
                    if usage:
                        yield event([], usage={"prompt_tokens": len(ids), "completion_tokens": v.completion_tokens,
                                               "total_tokens": len(ids) + v.completion_tokens})
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield "data: " + json.dumps(e.body()) + "\n\n"
        except Exception as e:  # noqa: BLE001 - the headers are sent: an error event is the only way to say it
            log.exception("generation failed")
            yield "data: " + json.dumps(ApiError(500, f"internal error ({type(e).__name__}); see the server log",
                                                 kind="server_error").body()) + "\n\n"

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
        return {"status": "ok", "model": backend.name, "generating": runner.generating, **state}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    app.state.counters = state
    app.state.runner = runner
    return app


def make_server(model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                limits: Limits | None = None, device: str = "auto", log=print, allowed_hosts=()):
    """The uvicorn.Server `deploy serve` runs: the model loaded, the app, deploy.transport's settings."""
    import uvicorn

    from deploy.backends import load_backend
    from deploy.transport import uvicorn_config

    limits = limits or Limits()
    warning = binding_warning(host, api_key)
    if warning:
        log(warning)
    hosts = allowed_hosts_for(host, allowed_hosts)
    backend = load_backend(model, device=device)
    app = create_app(backend, limits, api_key, hosts)
    log(f"serving {backend.name} on http://{host}:{port} (OpenAI API under /v1, chat page at /); "
        f"answering Host: {', '.join(hosts)}")
    return uvicorn.Server(uvicorn_config(app, host, port, limits))


def serve(model, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, limits: Limits | None = None,
          device: str = "auto", log=print, allowed_hosts=()):
    make_server(model, host, port, api_key, limits, device, log, allowed_hosts).run()
