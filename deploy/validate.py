"""What `deploy serve` checks before a request may wait for the model: the API key, the body (JSON only, its size,
its arrival time), the OpenAI fields (deploy.api_schema), the conversation (zhllama.chat) and the prompt length.

Every refusal is an ApiError, answered by `error_response` in OpenAI's error shape.
"""
from __future__ import annotations

import asyncio
import hmac

import anyio

from deploy.api_schema import ApiError, parse, sampling
from zhllama.errors import UserError


def error_response(e: ApiError, close: bool = False):
    """The JSON error response; `close` ends the connection (its request body may be left unread)."""
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers={"Connection": "close"} if close else None)


def check_key(request, api_key: str | None) -> None:
    if api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                           f"Bearer {api_key}".encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error")


async def read_body(request, limits) -> bytes:
    from starlette.requests import ClientDisconnect

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


async def prepare(request, backend, limits, api_key: str | None, chat: bool):
    """(prompt ids, sampling, request) for a fully read and valid request; ApiError otherwise."""
    from zhllama.chat import check_messages

    check_key(request, api_key)
    req = parse(await read_body(request, limits), chat)
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
