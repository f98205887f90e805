"""Streamed requests' text, from the workers' engines to the request that
waits for it.

The text travels as Dask events on one topic (``TOKENS_TOPIC``): a worker's
``log_event`` goes to the scheduler over the connection the worker already
holds, and the scheduler hands it to every subscribed client (this gateway's
cluster client), in the order the worker sent it.  Chosen over the other
ways because nothing is created per request that could outlive it: a
``distributed.Queue`` per stream stays on the scheduler when a gateway dies
before deleting it, a topic per stream stays in the scheduler's broker for
good, ``distributed.Pub`` drops what a worker publishes before it has heard
of the subscriber, and workers need not reach Redis.  The scheduler keeps
only the topic's last 1000 events (``distributed.admin.low-level-log-length``).

Nothing here is needed for the answer to be right: the task's result is the
whole answer, and the stream's end is made from it
(:mod:`bitinglip.gateway.routes.openai_stream`); a lost connection or a
rerun on another worker only makes the stream coarser.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bitinglip.platform.jobs import TOKENS_TOPIC

log = logging.getLogger(__name__)


class TokenStreams:
    """One per gateway: its cluster client's subscription to the text of the
    streams this gateway serves, routed to each stream's queue."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._open: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        client.subscribe_topic(TOKENS_TOPIC, self._on_event)

    def open(self, stream: str) -> asyncio.Queue[dict[str, Any]]:
        """The queue that ``stream``'s events arrive on (``{"index", "seq", "text"}``), until :meth:`close`."""
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._open[stream] = inbox
        return inbox

    def close(self, stream: str) -> None:
        self._open.pop(stream, None)

    def _on_event(self, event: tuple[float, Any]) -> None:
        """On the cluster client's own thread: hand the event to this gateway's loop."""
        _, msg = event
        if isinstance(msg, dict) and isinstance(msg.get("stream"), str):
            self._loop.call_soon_threadsafe(self._put, msg)

    def _put(self, msg: dict[str, Any]) -> None:
        inbox = self._open.get(msg["stream"])
        if inbox is not None:  # None: a stream another gateway serves, or one that ended
            inbox.put_nowait(msg)
