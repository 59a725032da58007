"""The model behind `deploy serve`: one generation at a time, and no client can keep it.

Requests wait for the model in arrival order (asyncio.Lock is FIFO). A request whose client leaves
while waiting is cancelled out of the line. A running generation is cancelled through `should_stop`,
which the backend checks at every token. The lock is released by the worker thread itself when the
backend has returned, never by an `await` in a `finally`: inside an anyio cancel scope (Starlette
cancels a stream whose client left) every such await is cancelled again, and the lock was never
released: the server locked up for good after one dropped stream.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import anyio

from deploy.api_schema import ApiError
from deploy.backends import Outcome
from zhllama.chat.stops import StopText

log = logging.getLogger("zhllama.serve")


class ModelRunner:
    def __init__(self, backend):
        self.backend = backend
        self._gate = asyncio.Lock()
        self.generating = 0
        self.released_at = 0.0   # time.monotonic() of the last release of the model

    def _free(self):
        self.generating -= 1
        self.released_at = time.monotonic()
        self._gate.release()

    async def generate(self, ids: list[int], s, stops: list[str], deadline: float):
        """Async iterator of text pieces (cut at a stop string), then the Outcome. `deadline` is
        time.monotonic(); waiting for the model counts."""
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                await self._gate.acquire()
        except TimeoutError:
            raise ApiError(503, "timed out waiting for the model", kind="timeout") from None
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        outcome = Outcome()

        def should_stop():
            return cancel.is_set() or time.monotonic() > deadline

        def post(fn, *a):
            try:
                loop.call_soon_threadsafe(fn, *a)
            except RuntimeError:   # the event loop is gone: the server is shutting down
                pass

        def work():
            try:
                # never break out of backend.stream early: it returns only once its own generate thread
                # has stopped, so the model is really free when the lock is released below
                for piece in self.backend.stream(ids, s, should_stop, outcome):
                    post(q.put_nowait, ("piece", piece))
                post(q.put_nowait, ("done", outcome))
            except BaseException as e:  # noqa: BLE001 - handed to the request, which reports it
                post(q.put_nowait, ("error", e))
            finally:
                post(self._free)

        self.generating += 1
        try:
            threading.Thread(target=work, daemon=True, name="zhllama-generate").start()
        except BaseException:
            self._free()
            raise
        stop = StopText(stops)
        try:
            while True:
                kind, v = await q.get()
                if kind == "piece":
                    if stop.hit:
                        continue
                    text = stop.feed(v)
                    if text:
                        yield text
                    if stop.hit:
                        cancel.set()
                elif kind == "done":
                    tail = stop.flush()
                    if tail:
                        yield tail
                    if stop.hit:
                        v.finish_reason = "stop"
                    elif time.monotonic() > deadline:
                        v.finish_reason = "length"
                    yield v
                    return
                else:
                    raise v
        finally:
            cancel.set()   # synchronous on purpose (see the module docstring)
