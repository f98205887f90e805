"""The token budgets a worker learned from running out of memory.

When a micro-batch of a model runs out of memory the runner splits it and
lowers the model's budget here, so the worker's later partitions plan
smaller batches from the start instead of failing and splitting again.  One
instance per worker, owned by its model plugin, so it lives as long as the
worker's loaded models do; partitions run in several task threads at once,
hence the lock.
"""

from __future__ import annotations

import threading


class ReducedBudgets:
    """Per model key (task, model, device): the lowest token budget that fit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._budgets: dict[str, int] = {}

    def cap(self, key: str, budget: int) -> int:
        """``budget``, or less if ``key`` ran out of memory with more."""
        with self._lock:
            return min(budget, self._budgets.get(key, budget))

    def reduce(self, key: str, budget: int, size: int) -> None:
        """A batch of ``size`` tokens ran out of memory: half of it is the most ``key`` gets from now on."""
        with self._lock:
            self._budgets[key] = max(1, min(self._budgets.get(key, budget), size // 2))

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._budgets)
