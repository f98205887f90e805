"""A request's work, given up when its client disconnects first.

Starlette does not cancel a handler whose client has gone: a chat the client
abandoned kept its place in the batcher, and its task on the cluster, until
the batcher's own timeout (120 s).  Once the body has been read, the next
message the server hands the app is ``http.disconnect``; waiting for it beside
the work tells when to cancel the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

T = TypeVar("T")
#: nginx's "client closed request": logged, never read by anyone
CLIENT_CLOSED = 499


async def unless_disconnected(request: Request, work: Awaitable[tuple[T, int]]) -> tuple[T | None, int]:
    """``work``'s result, or ``(None, 0)`` once the client has disconnected
    first: ``work`` is then cancelled, so the batcher lets go of the
    cluster's task.  The body has been read, so the next message the server
    hands the app is ``http.disconnect``."""
    running = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait((running, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not running.done():
            running.cancel()
    if running.done() and not running.cancelled():
        return running.result()
    await asyncio.gather(running, return_exceptions=True)  # its cancellation has run to its end
    return None, 0


async def disconnected(request: Request) -> Any:
    """Returns once the client has disconnected (call it only once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
