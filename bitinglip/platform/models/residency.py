"""Which models a worker keeps loaded: least recently used first, by bytes.

Pure bookkeeping, no torch: the worker plugin loads and frees; this decides
what may be freed.  An entry is *held* while a running task uses it (by the
task's key, released when the task leaves the executing state, or by a
``use()`` count); a held entry is never chosen for eviction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Entry:
    key: Hashable
    loaded: Any
    nbytes: int
    model: str  # as the job named it
    task: str
    dtype: str | None
    path: str
    version: str | None = None
    sha256: str | None = None
    holders: set[Hashable] = field(default_factory=set)
    uses: int = 0
    pin_fd: int | None = None  # shared flock on the registry version while held

    @property
    def held(self) -> bool:
        return bool(self.holders) or self.uses > 0


class Residency:
    """An LRU of entries with a byte budget. Thread-safe; every method is short.

    ``on_hold`` runs when an entry becomes held and ``on_free`` when it is
    free again, both under the lock (the plugin takes and drops a file lock
    there); an ``on_hold`` that raises leaves the entry free."""

    def __init__(self, budget_bytes: int, on_hold: Callable[[Entry], None] | None = None,
                 on_free: Callable[[Entry], None] | None = None) -> None:
        self.budget_bytes = budget_bytes
        self._on_hold = on_hold or (lambda entry: None)
        self._on_free = on_free or (lambda entry: None)
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self._by_task: dict[Hashable, set[Hashable]] = {}
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def get(self, key: Hashable) -> Entry | None:
        """The entry, marked most recently used; None when not loaded."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def add(self, entry: Entry) -> None:
        """Keep ``entry``; one that replaces an entry of its key (a restarted engine) is held by whoever held
        the old one, whose tasks still release that key."""
        with self._lock:
            old = self._entries.get(entry.key)
            if old is not None and old is not entry:
                entry.holders, entry.uses, entry.pin_fd = old.holders, old.uses, old.pin_fd
                old.holders, old.uses, old.pin_fd = set(), 0, None
            self._entries[entry.key] = entry

    def victims(self, incoming: int, keep: Hashable | None = None) -> list[Entry]:
        """Entries to evict, least recently used first, so that ``incoming``
        more bytes fit; held entries (and ``keep``) are skipped, so the result
        may not free enough."""
        with self._lock:
            over = sum(e.nbytes for e in self._entries.values()) + incoming - self.budget_bytes
            out = []
            for entry in self._entries.values():
                if over <= 0:
                    break
                if entry.held or entry.key == keep:
                    continue
                out.append(entry)
                over -= entry.nbytes
            return out

    def pop(self, key: Hashable) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.held:
                return None
            return self._entries.pop(key)

    def drop(self, key: Hashable) -> Entry | None:
        """Remove ``key``'s entry even while held (a model broken on this worker): its holds end with it,
        and its holders' later releases find nothing."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None and entry.held:
                entry.holders, entry.uses = set(), 0
                self._on_free(entry)
            return entry

    def hold(self, key: Hashable, task_key: Hashable | None) -> tuple[Entry, bool]:
        """Hold an entry for a running task (or, with None, for one ``use``);
        returns it and whether it was free before."""
        with self._lock:
            entry = self._entries[key]
            was_free = not entry.held
            if was_free:
                self._on_hold(entry)
            if task_key is None:
                entry.uses += 1
            else:
                entry.holders.add(task_key)
                self._by_task.setdefault(task_key, set()).add(key)
            return entry, was_free

    def release(self, key: Hashable | None = None, task_key: Hashable | None = None) -> list[Entry]:
        """Drop one ``use`` of ``key``, or every hold of ``task_key``; returns
        the entries that became free."""
        freed = []
        with self._lock:
            if task_key is not None:
                for k in self._by_task.pop(task_key, ()):
                    entry = self._entries.get(k)
                    if entry is not None and task_key in entry.holders:
                        entry.holders.discard(task_key)
                        if not entry.held:
                            freed.append(entry)
            elif key is not None and key in self._entries:
                entry = self._entries[key]
                was_held = entry.held
                entry.uses = max(0, entry.uses - 1)
                if was_held and not entry.held:
                    freed.append(entry)
            for entry in freed:
                self._on_free(entry)
            return freed

    def holds_task(self, task_key: Hashable) -> bool:
        with self._lock:
            return task_key in self._by_task

    def entries(self) -> list[Entry]:
        """A snapshot, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def clear(self) -> list[Entry]:
        with self._lock:
            out = list(self._entries.values())
            self._entries.clear()
            self._by_task.clear()
            return out
