"""uvicorn's h11 protocol with a deadline for the request line and headers.

uvicorn times out only an idle kept-alive connection, and only after a
first response: a client that connects and sends nothing, or trickles its
headers a byte at a time, holds a connection for as long as it likes.  This
subclass closes such a connection once ``header_timeout_s`` pass without a
complete request head; the body has its own deadline
(:class:`bitinglip.gateway.middleware.BodyTimeout`).

It leans on ``H11Protocol``'s internals (``cycle``, ``loop``, ``transport``,
``handle_events``, ``on_response_complete``): they live here alone, and
``tests/gateway/test_hardening.py`` fails loudly if an upgrade moves them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self._in_request():  # the head is in: from here the body's deadline and the app rule
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_request():  # waiting for the next request's head
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        # no response is possible before a request head: h11 only lets us hang up
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()


def protocol(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn's ``http=``, with this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
