"""A scheduler plugin that writes job status and progress to Redis.

It runs inside the Dask scheduler, so a job's record stays true whatever
happens to the gateway that submitted it, and every gateway reads the same
record.  It watches two things: task transitions of a job's keys
(``bitinglip-{job}-{part}`` and ``bitinglip-{job}-manifest``, as
:meth:`Platform.submit` names them) and the workers' progress events.  Hooks
only note what changed; a loop on the scheduler's event loop writes the
changes every ``interval_s``, so Redis latency never slows the scheduler.

Only jobs that already have a record (the gateway creates it before
submitting) are updated; jobs of Python clients are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from bitinglip.platform.jobs import JobState
from bitinglip.platform.jobstore import MISSING, MOVED, REFUSED, TERMINAL, JobStore
from bitinglip.platform.runner import PROGRESS_TOPIC

log = logging.getLogger(__name__)
KEY = re.compile(r"^bitinglip-(?P<job>[0-9a-f]{32})-(?P<part>\d+|manifest)$")
#: jobs remembered as "not ours" so their events cost nothing
IGNORED_MAX = 10_000


def job_keys(job_id: str, parts: int, manifest: bool = True) -> list[str]:
    """The Dask keys of a job's tasks."""
    out = [f"bitinglip-{job_id}-{i}" for i in range(parts)]
    return out + [f"bitinglip-{job_id}-manifest"] if manifest else out


@dataclass
class _Track:
    state: str = JobState.QUEUED.value
    written: str = JobState.QUEUED.value
    done: dict[int, int] = field(default_factory=dict)
    totals: dict[int, int] = field(default_factory=dict)
    started_at: float | None = None
    error: str | None = None


class RedisStatusPlugin(SchedulerPlugin):
    """Register once per Redis (the name carries a hash of the URL); a second
    gateway registering the same plugin leaves the running one in place."""

    idempotent = True

    def __init__(self, redis_url: str, job_ttl_s: int, interval_s: float = 0.25) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.redis_url = redis_url
        self.job_ttl_s = job_ttl_s
        self.interval_s = interval_s
        self.name = "bitinglip-redis-status-" + hashlib.sha1(redis_url.encode()).hexdigest()[:10]
        self._reset()

    def _reset(self) -> None:
        self._jobs: dict[str, _Track] = {}
        self._dirty: set[str] = set()
        self._ignored: OrderedDict[str, None] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._scheduler: Any = None
        self._redis: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"redis_url": self.redis_url, "job_ttl_s": self.job_ttl_s, "interval_s": self.interval_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    async def start(self, scheduler: Any) -> None:
        import redis.asyncio as aioredis

        self._scheduler = scheduler
        self._redis = aioredis.from_url(self.redis_url, decode_responses=True)
        self._store = JobStore(self._redis, self.job_ttl_s)
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._flush()
        if self._redis is not None:
            await self._redis.aclose()

    # --- hooks: cheap, no I/O
    def _track(self, job: str) -> _Track | None:
        if job in self._ignored:
            return None
        return self._jobs.setdefault(job, _Track())

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        match = KEY.match(key) if isinstance(key, str) else None
        if match is None:
            return
        track = self._track(match["job"])
        if track is None or track.state in TERMINAL:
            return
        part = match["part"]
        if finish == "processing" and track.state == JobState.QUEUED.value:
            track.state = JobState.RUNNING.value
            track.started_at = track.started_at or time.time()
        elif finish == "memory" and part == "manifest":
            track.state = JobState.SUCCEEDED.value
        elif finish == "memory":
            index = int(part)
            track.done[index] = max(track.done.get(index, 0), track.totals.get(index, 0))
        elif finish == "erred":
            track.state = JobState.FAILED.value
            track.error = self._error_text(key)
        else:
            return
        self._dirty.add(match["job"])

    def _error_text(self, key: str) -> str:
        ts = self._scheduler.tasks.get(key) if self._scheduler is not None else None
        if ts is None:
            return "a task failed"
        blame = ts.exception_blame
        text = ts.exception_text or (blame.exception_text if blame is not None else "") or "a task failed"
        where = blame.key if blame is not None else key
        return f"{where}: {text}"[:2000]

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != PROGRESS_TOPIC or not isinstance(msg, dict):
            return
        job = msg.get("job")
        track = self._track(job) if isinstance(job, str) else None
        if track is None or track.state in TERMINAL:
            return
        part = int(msg.get("part", 0))
        track.done[part] = max(track.done.get(part, 0), int(msg.get("done", 0)))
        track.totals[part] = int(msg.get("total", 0))
        if track.state == JobState.QUEUED.value:
            track.state = JobState.RUNNING.value
            track.started_at = track.started_at or time.time()
        self._dirty.add(job)

    # --- the writer
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._flush()
            except Exception:  # Redis may be down for a while; keep the changes
                log.warning("writing job status to Redis failed; will retry", exc_info=True)

    async def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for job in dirty:
            track = self._jobs.get(job)
            if track is None:
                continue
            fields: dict[str, Any] = {"rows_done": sum(track.done.values()), "started_at": track.started_at}
            if track.state in TERMINAL:
                fields["finished_at"] = time.time()
            if track.error:
                fields["error"] = track.error
            try:
                outcome = await self._store.transition(job, None if track.state == track.written else track.state,
                                                       fields)
            except Exception:
                self._dirty.add(job)
                raise
            if outcome == MISSING:
                self._jobs.pop(job, None)
                self._ignored[job] = None
                while len(self._ignored) > IGNORED_MAX:
                    self._ignored.popitem(last=False)
            elif outcome == REFUSED or (outcome == MOVED and track.state in TERMINAL):
                self._jobs.pop(job, None)  # finished (here, or cancelled by a gateway)
            else:
                track.written = track.state
