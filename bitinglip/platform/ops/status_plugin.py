"""A scheduler plugin that writes job status and progress to Redis.

It runs inside the Dask scheduler, so a job's record stays true whatever
happens to the gateway that submitted it, and every gateway reads the same
record.  It watches two things: task transitions of a job's keys
(``bitinglip-{job}-{part}`` and ``bitinglip-{job}-manifest``, as
:meth:`Platform.submit` names them) and the workers' progress events.  Hooks
only note what changed; a loop on the scheduler's event loop writes the
changes every ``interval_s``, so Redis latency never slows the scheduler.

Only REST jobs are followed: the gateway annotates their tasks with the job's
id (:data:`ANNOTATION`, never caller-supplied values: the scheduler encodes
annotations with msgpack); jobs of Python clients are ignored.

The plugin keeps each job's hash as Redis last returned it, and finished
jobs' hashes for their TTL (up to :data:`FINISHED_MAX`).  When Redis loses
its data (the dataset stamp is gone, or a followed job's hash is), it writes
them back with :meth:`JobStore.restore` and then its current figures, so the
status is true again within one or two intervals.  Finished jobs it has
forgotten come back from their output manifests (``bitinglip.gateway.rebuild``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from bitinglip.platform.cluster.dask_internals import scheduler_holds_none
from bitinglip.platform.jobs.jobstore import MISSING, MOVED, REFUSED, JobStore, flat
from bitinglip.platform.jobs.vocabulary import (
    ANNOTATION,
    MANIFEST_PART,
    PROGRESS_TOPIC,
    TERMINAL,
    JobState,
    parse_task_key,
)

log = logging.getLogger(__name__)
#: finished jobs whose records are kept to rebuild Redis
FINISHED_MAX = 10_000


def _error_text(key: str, details: dict[str, Any]) -> str:
    """``{failing task}: {its exception}`` from what the scheduler passes
    plugins on a move to ``erred``: ``cause`` is the task that failed (the
    first ``erred`` of a job is always that task's own), ``exception_text``
    its error; a task failed by the scheduler (a worker died too often, or
    its result was too large) comes without a text."""
    text = details.get("exception_text") or "a task failed"
    where = details.get("cause") or key
    return f"{where}: {text}"[:2000]


@dataclass
class _Track:
    record: dict[str, str]  # the job's hash as last seen: its id, then what Redis returned
    keys: set[str] = field(default_factory=set)
    state: str = JobState.QUEUED.value
    done: dict[int, int] = field(default_factory=dict)
    totals: dict[int, int] = field(default_factory=dict)
    reused: dict[int, int] = field(default_factory=dict)  # rows taken from the result store, per partition
    started_at: float | None = None
    error: str | None = None

    @property
    def submitted(self) -> bool:
        """The gateway wrote its figures after handing the job over (until
        then, restoring the record is the gateway's business)."""
        return "parts" in self.record


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
        self._finished: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._dirty: set[str] = set()
        self._seen = ""  # the dataset stamp last seen; "" forces a check
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
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
        # the writer also stops on this flag: redis-py 8.2's asyncio client can lose a cancel that lands inside a
        # command (the command returns, the task goes on), and a writer that looped on kept the scheduler's
        # close waiting for ever (tests/unit/test_status_plugin_close.py)
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._flush()
        if self._redis is not None:
            await self._redis.aclose()

    # --- hooks: cheap, no I/O
    def update_graph(self, scheduler: Any, *, annotations: dict[str, dict[Any, Any]] | None = None,
                     **kwargs: Any) -> None:
        for key, record in ((annotations or {}).get(ANNOTATION) or {}).items():
            parsed = parse_task_key(key)
            if parsed is None or not isinstance(record, dict):
                continue
            job = parsed[0]
            if job in self._finished:
                if not record.get("resumed_at"):
                    continue
                del self._finished[job]  # a resumed job (POST .../resume): follow it again
            track = self._jobs.get(job)
            if track is None:
                track = self._jobs[job] = _Track(record=flat(record))
                self._dirty.add(job)
            track.keys.add(key)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        parsed = parse_task_key(key)
        track = self._jobs.get(parsed[0]) if parsed is not None else None
        if parsed is None or track is None or track.state in TERMINAL:
            return
        job, part = parsed
        if finish == "processing" and track.state == JobState.QUEUED.value:
            track.state = JobState.RUNNING.value
            track.started_at = track.started_at or time.time()
        elif finish == "memory" and part == MANIFEST_PART:
            track.state = JobState.SUCCEEDED.value
        elif finish == "memory":
            index = int(part)
            track.done[index] = max(track.done.get(index, 0), track.totals.get(index, 0))
        elif finish == "erred":
            track.state = JobState.FAILED.value
            track.error = _error_text(key, kwargs)
        # any other move (released, forgotten: a cancel) only asks for a look at the record
        self._dirty.add(job)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != PROGRESS_TOPIC or not isinstance(msg, dict):
            return
        job = msg.get("job")
        track = self._jobs.get(job) if isinstance(job, str) else None
        if not isinstance(job, str) or track is None or track.state in TERMINAL:
            return
        part = int(msg.get("part", 0))
        track.done[part] = max(track.done.get(part, 0), int(msg.get("done", 0)))
        track.totals[part] = int(msg.get("total", 0))
        track.reused[part] = int(msg.get("reused") or 0)
        if track.state == JobState.QUEUED.value:
            track.state = JobState.RUNNING.value
            track.started_at = track.started_at or time.time()
        self._dirty.add(job)

    # --- what the Jobs page shows
    def shown(self, job: str) -> tuple[str, int] | None:
        """The state and rows done of ``job`` as REST shows them (None: not
        a job of this plugin).  A finished job's come from its record in
        Redis: a cancel through the gateway fixes them there."""
        record = self._finished.get(job)
        if record is not None:
            return str(record.get("state") or JobState.CANCELLED.value), int(record.get("rows_done") or 0)
        track = self._jobs.get(job)
        if track is None:
            return None
        if track.record.get("state") in TERMINAL:  # ended in Redis (a gateway's cancel) before here
            return str(track.record["state"]), int(track.record.get("rows_done") or 0)
        return track.state, sum(track.done.values())

    # --- the writer
    async def _loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.interval_s)
            try:
                await self._check_dataset()
                await self._flush()
            except Exception:  # Redis may be down for a while; keep the changes
                if not self._failing:
                    log.warning("writing job status to Redis failed; retrying", exc_info=True)
                self._failing = True
            else:
                self._failing = False

    async def _check_dataset(self) -> None:
        """Write back every record Redis lost, once per lost dataset."""
        if not await self._store.dataset_changed(self._seen):
            return
        self._seen = await self._store.mark_dataset()  # first: a loss during the rebuild is seen again
        restored = 0
        try:
            for job, track in list(self._jobs.items()):
                if track.submitted:
                    restored += await self._store.restore(track.record)
                    self._dirty.add(job)  # then the figures gathered since
            cutoff = time.time() - self.job_ttl_s
            for job, record in list(self._finished.items()):
                if float(record.get("finished_at") or 0) < cutoff:
                    del self._finished[job]
                else:
                    restored += await self._store.restore(record)
        except Exception:
            self._seen = ""
            raise
        if restored:
            log.warning("Redis had lost %d job records; written back from the scheduler's memory", restored)

    async def _flush(self) -> None:
        pending = list(self._dirty)
        self._dirty.clear()
        try:
            while pending:
                track = self._jobs.get(pending[-1])
                if track is not None:
                    await self._write(pending[-1], track)
                pending.pop()
        finally:
            self._dirty.update(pending)  # what was not written goes again next time

    async def _write(self, job: str, track: _Track) -> None:
        # what this write says, taken once: the hooks may move the job on while it is on its way to Redis
        # (a job whose manifest ended during the write of its "running" was taken for written as succeeded,
        # dropped, and stayed "running" in Redis for ever)
        state = track.state
        fields: dict[str, Any] = {"rows_done": sum(track.done.values()), "rows_reused": sum(track.reused.values()),
                                  "started_at": track.started_at}
        if state in TERMINAL:
            fields["finished_at"] = time.time()
        if track.error:
            fields["error"] = track.error
        # the state always goes along: after a restore the record may be behind it
        outcome, record = await self._store.transition_and_get(job, state, fields)
        if outcome == MISSING:
            if track.submitted:
                self._seen = ""  # Redis lost it: look at the dataset, restore, write again
                self._dirty.add(job)
            elif scheduler_holds_none(track.keys, self._scheduler):
                self._jobs.pop(job, None)  # its submission failed, and the gateway removed it
            return
        track.record = record
        if outcome == REFUSED or (outcome == MOVED and state in TERMINAL):
            self._jobs.pop(job, None)  # finished (here, or cancelled by a gateway)
            self._finished[job] = record
            while len(self._finished) > FINISHED_MAX:
                self._finished.popitem(last=False)
        elif not track.submitted:
            self._dirty.add(job)  # read again until the gateway's figures are in
