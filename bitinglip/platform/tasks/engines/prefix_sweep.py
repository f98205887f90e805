"""The rows an engine holds back, handed out grouped by prompt prefix.

A worker's engine serves every generate partition on that worker at once
(up to ``runner.ENGINE_PARTITIONS``).  Each partition sorts its own rows by
prompt (``generation.prefix_order``), but rows of one system prompt or one
document are spread over all of a job's partitions, and partitions reach
the engine one after another: handed over as they come, each partition's
rows go through every prefix again, and a KV cache too small for all the
prefixes evicts each one before the next partition needs it.

So the engine keeps rows it does not need yet in a :class:`PrefixSweep`
and gives vLLM only a short queue ahead of what it runs.  The sweep hands
rows out in prompt order, like a lift: a row whose prompt sorts at or
after the last one handed out joins the current pass; one that sorts
before it waits for the next pass.  Rows sharing a prefix from every
partition on the worker thus reach the engine together.

A pass takes in late rows for :data:`JOIN_S` after it began (the
partitions of a job reach a worker's engine in a burst when it starts),
then at most as many as it held when it began, so rows that keep arriving
ahead of it (one job's partitions of a sorted corpus, say) cannot keep it
going while another tenant's rows wait behind it: a row waits at most for
twice what was queued before it, and what came in that first second.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

#: seconds after a pass begins in which every late row that sorts after the last one taken joins it
JOIN_S = 1.0


class PrefixSweep:
    """Items keyed by token ids, taken in key order, one pass at a time.

    Not thread-safe: the engine uses it under its own lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pass: list[tuple[tuple[int, ...], int, Any]] = []  # keys at or after the last taken
        self._next: list[tuple[tuple[int, ...], int, Any]] = []  # keys before it: the next pass
        self._last: tuple[int, ...] | None = None  # None: no pass under way
        self._room = 0  # late rows the pass under way may still take in, once its first JOIN_S are over
        self._open_until = 0.0  # the end of its first JOIN_S
        self._seq = itertools.count()  # equal keys keep their arrival order, and items are never compared

    def __len__(self) -> int:
        return len(self._pass) + len(self._next)

    def add(self, key: Sequence[int], item: Any) -> None:
        entry = (tuple(key), next(self._seq), item)
        if self._last is None:
            heapq.heappush(self._pass, entry)
        elif entry[0] >= self._last and (self._room > 0 or self._clock() < self._open_until):
            self._room -= 1
            heapq.heappush(self._pass, entry)
        else:
            heapq.heappush(self._next, entry)

    def take(self, count: int) -> list[Any]:
        """Up to ``count`` items, the next in this pass's order."""
        taken: list[Any] = []
        while len(taken) < count and (self._pass or self._next):
            if not self._pass:  # this pass is over: the rows that came in behind it start the next one
                self._pass, self._next = self._next, []
                self._last = None
            if self._last is None:  # a pass begins
                self._room, self._open_until = len(self._pass), self._clock() + JOIN_S
            key, _, item = heapq.heappop(self._pass)
            self._last = key
            taken.append(item)
        if not self:
            self._last = None
        return taken
