"""The two shapes of an answer in `deploy serve`: one JSON completion, or a stream of server-sent events.

Both take the text pieces and the final Outcome from deploy.engine.ModelRunner.generate. A whole answer stops
generating as soon as its client leaves; a stream always ends with `data: [DONE]` or an error event.
"""
from __future__ import annotations

import asyncio
import json
import logging

import anyio

from deploy.api_schema import ApiError

log = logging.getLogger("zhllama.serve")


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


async def client_gone(request):
    # the body is read: the next ASGI message is http.disconnect, when the client closes the connection
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(ids, completion_tokens: int) -> dict:
    return {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
            "total_tokens": len(ids) + completion_tokens}


async def answer(request, runner, model: str, ids, s, stops, deadline, rid, created, chat):
    """The whole completion as one JSON object; a 499 response (read by nobody) when the client left first."""
    from fastapi.responses import Response

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
            "model": model, "choices": [choice], "usage": _usage(ids, outcome.completion_tokens)}


async def sse(runner, model: str, ids, s, stops, deadline, rid, created, chat, usage):
    """Always ends with `data: [DONE]` or an error event, never a cut stream."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choices, **extra):
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
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
                    yield event([], usage=_usage(ids, v.completion_tokens))
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield "data: " + json.dumps(e.body()) + "\n\n"
    except Exception as e:  # noqa: BLE001 - the headers are sent: an error event is the only way to say it
        log.exception("generation failed")
        yield "data: " + json.dumps(ApiError(500, f"internal error ({type(e).__name__}); see the server log",
                                             kind="server_error").body()) + "\n\n"
