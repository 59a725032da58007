"""The routes of `deploy serve`: GET /v1/models, POST /v1/chat/completions and /v1/completions, GET /health, and
the browser chat page at GET /.

A completion request is validated whole (deploy.validate) before it takes a queue slot; more than
limits.max_queue waiting or running get 429. The slot is freed exactly once, when the answer or its stream ends.

No `from __future__ import annotations` here: FastAPI reads the route functions' annotations at runtime, and
a string "Request" naming a name imported inside add_api_routes would turn into a required query field (422).
"""
import time
import uuid
from pathlib import Path

from deploy.api_schema import ApiError
from deploy.engine import ModelRunner
from deploy.responses import answer, event_stream, sse
from deploy.validate import check_key, error_response, prepare
from zhllama.errors import UserError

PAGE = Path(__file__).resolve().parent / "web" / "chat.html"


class Service:
    """What the routes share: the backend and its runner, the limits, the API key, the request counters."""

    def __init__(self, backend, limits, api_key: str | None = None):
        self.backend, self.limits, self.api_key = backend, limits, api_key
        self.runner = ModelRunner(backend)
        self.state = {"pending": 0, "finished": 0, "refused": 0}

    def take_slot(self):
        """A function that frees the queue slot taken now (once, however often it is called); ApiError(429) when
        the queue is full."""
        if self.state["pending"] >= self.limits.max_queue:
            self.state["refused"] += 1
            raise ApiError(429, f"server busy: {self.state['pending']} requests queued (limit {self.limits.max_queue}); "
                                "retry later", kind="rate_limit_error")
        self.state["pending"] += 1
        freed = []

        def free_slot():
            if not freed:
                freed.append(1)
                self.state["pending"] -= 1
                self.state["finished"] += 1

        return free_slot

    async def respond(self, request, chat: bool):
        try:
            ids, s, req = await prepare(request, self.backend, self.limits, self.api_key, chat)
        except ApiError as e:   # the body may be unread: end the connection
            return error_response(e, close=e.status in (401, 408, 413, 415, 499))
        except UserError as e:
            return error_response(ApiError(400, str(e)))
        try:
            free_slot = self.take_slot()
        except ApiError as e:
            return error_response(e)
        deadline = time.monotonic() + self.limits.timeout
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        args = (self.backend.name, ids, s, req.stops(), deadline, rid, created, chat)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return event_stream(sse(self.runner, *args, usage), free_slot)
        try:
            return await answer(request, self.runner, *args)
        except ApiError as e:
            return error_response(e)
        finally:
            free_slot()


def add_api_routes(app, service: Service) -> None:
    from fastapi import Request

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request, service.api_key)
        except ApiError as e:
            return error_response(e)
        name = service.backend.name
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "zhllama"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.respond(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.respond(request, chat=False)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.backend.name, "generating": service.runner.generating,
                **service.state}


def add_page(app, page: Path = PAGE) -> None:
    """The browser chat (deploy/web/chat.html), which talks to /v1/chat/completions."""
    from fastapi.responses import HTMLResponse

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page.read_text(encoding="utf-8"))
