"""`deploy serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and the browser chat page.

Endpoints: GET /v1/models, POST /v1/chat/completions (streamed by server-sent events, or not),
POST /v1/completions (raw prompt, no template), GET / (the chat page), GET /health.
Decoding defaults to the paper's preset (sft.generate.PRESETS["paper"]); request fields override it
(temperature 0 = the greedy preset; zhllama extensions: "preset", "top_k", "repetition_penalty").
The jobs live in their own modules: request fields in deploy.api_schema, the checks before a request may queue
(API key, body, prompt length) in deploy.validate, the routes and the queue in deploy.routes, the JSON and
server-sent-event answers in deploy.responses, the shared model in deploy.engine, uvicorn's connection limits in
deploy.transport; this module sets the limits and the hosts, and assembles the app (create_app).

Safe by default: binds 127.0.0.1; only Host headers naming an allowed host are answered (DNS
rebinding); an optional API key (Bearer); JSON bodies only (415 otherwise, so a web page on another
site cannot make the browser post to it); bodies over --max-body bytes get 413, bodies not received
within --body-timeout seconds 408; requests are queued only once read and validated, and more than
--max-queue waiting or running get 429; a request stops generating after --timeout seconds, and as
soon as its client leaves. One generation runs at a time; the others wait their turn in arrival order.
"""

import ipaddress
import json
import logging
from dataclasses import dataclass

from deploy.api_schema import ApiError, parse, sampling
from deploy.responses import event_stream  # noqa: F401  (public here since the first version)
from deploy.routes import PAGE, Service, add_api_routes, add_page  # noqa: F401  (PAGE: public here too)
from deploy.validate import error_response

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


def protect(app, allowed_hosts=None) -> None:
    """Host header check (DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends "Host: evil.example")
    and one OpenAI-shaped 500 for an unexpected error, logged with its traceback (never sent)."""
    from fastapi import Request
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS), www_redirect=False)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error ({type(e).__name__}); see the server log",
                                       kind="server_error"))


def create_app(backend, limits: Limits | None = None, api_key: str | None = None, allowed_hosts=None):
    """The ASGI app: protect (hosts, errors) + the API routes (deploy.routes) + the chat page."""
    from fastapi import FastAPI

    service = Service(backend, limits or Limits(), api_key)
    app = FastAPI(title="zhllama", docs_url=None, redoc_url=None, openapi_url=None)
    protect(app, allowed_hosts)
    add_api_routes(app, service)
    add_page(app)
    app.state.counters = service.state
    app.state.runner = service.runner
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
