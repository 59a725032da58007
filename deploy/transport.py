"""uvicorn settings for `deploy serve`: bounded connections and a deadline on every request head.

uvicorn limits concurrent connections (`limit_concurrency`: 503 beyond it), the size of a request
head (h11's max incomplete event size) and idle keep-alive time, but a client that connects and then
trickles its headers, or never sends them, holds its connection forever. The protocol below closes
such a connection after `head_timeout` seconds. Bodies get their own deadline in the app (408).
"""
from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 * 1024


class HeadDeadlineH11(H11Protocol):
    head_timeout = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm_head_deadline()       # the next request head on a kept-alive connection

    def connection_lost(self, exc):
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self):
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        armed_for = self.cycle

        def expire():
            # still no new request head since the timer was armed, and none being answered: close
            if self.cycle is armed_for and (self.cycle is None or self.cycle.response_complete) \
                    and not self.transport.is_closing():
                self.transport.close()

        self._head_timer = self.loop.call_later(self.head_timeout, expire)


def uvicorn_config(app, host: str, port: int, limits, log_level: str = "warning"):
    import uvicorn

    proto = type("HeadDeadlineH11", (HeadDeadlineH11,), {"head_timeout": limits.head_timeout})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=proto,
                          limit_concurrency=limits.max_connections, timeout_keep_alive=5,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES)
