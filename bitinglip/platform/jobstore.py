"""Job status in Redis: one hash per job, with explicit state transitions.

Both writers use this module: the gateway creates a job and cancels it, the
scheduler plugin (:mod:`bitinglip.platform.status_plugin`) moves it through
running to its end.  Every state change runs as one Lua script that checks
the transition against :data:`TRANSITIONS`, updates the hash and the
per-state index together, and gives a finished job its TTL, so two writers
never leave the hash and the indexes disagreeing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from bitinglip.platform import keys
from bitinglip.platform.jobs import JobState

TERMINAL = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)
STATES = tuple(s.value for s in JobState)

#: allowed moves; a finished job never changes again
TRANSITIONS: dict[str, tuple[str, ...]] = {
    JobState.QUEUED.value: (JobState.RUNNING.value, *TERMINAL),
    JobState.RUNNING.value: TERMINAL,
    JobState.SUCCEEDED.value: (),
    JobState.FAILED.value: (),
    JobState.CANCELLED.value: (),
}

#: outcomes of :meth:`JobStore.transition`
MISSING, REFUSED, UPDATED, MOVED = "missing", "refused", "updated", "moved"

# KEYS: job hash, then the five state indexes in STATES order.
# ARGV: job id, new state ('' to only update fields), allowed previous states
# (comma-separated), now, ttl seconds, then field/value pairs.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 'missing' end
local new = ARGV[2]
local states = {'queued', 'running', 'succeeded', 'failed', 'cancelled'}
local function index(s) for i, v in ipairs(states) do if v == s then return KEYS[i + 1] end end end
local terminal = (cur == 'succeeded' or cur == 'failed' or cur == 'cancelled')
if new == '' or new == cur then
  if terminal then return 'refused' end
  if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
  return 'updated'
end
if not string.find(',' .. ARGV[3] .. ',', ',' .. cur .. ',', 1, true) then return 'refused' end
redis.call('HSET', KEYS[1], 'state', new)
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
redis.call('ZREM', index(cur), ARGV[1])
redis.call('ZADD', index(new), ARGV[4], ARGV[1])
if new == 'succeeded' or new == 'failed' or new == 'cancelled' then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('ZREMRANGEBYSCORE', index(new), '-inf', tonumber(ARGV[4]) - tonumber(ARGV[5]))
end
return 'moved'
"""

# KEYS: job hash, owner index, all-jobs index, queued index, idempotency key ('' slot if none)
# ARGV: job id, now, idempotency ttl, field/value pairs
_CREATE = """
if KEYS[5] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return existing end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.error_reply('job exists') end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
if KEYS[5] ~= '' then redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[3]) end
return ARGV[1]
"""

_INT_FIELDS = ("rows_total", "rows_done", "parts", "priority")
_FLOAT_FIELDS = ("created_at", "started_at", "finished_at", "updated_at")


def _flat(fields: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        if value is None:
            continue
        out += [name, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return out


def decode(raw: Mapping[str, str]) -> dict[str, Any]:
    """A job hash as typed values."""
    job: dict[str, Any] = dict(raw)
    for name in _INT_FIELDS:
        if name in job:
            job[name] = int(job[name])
    for name in _FLOAT_FIELDS:
        if name in job:
            job[name] = float(job[name])
    if "options" in job:
        job["options"] = json.loads(job["options"])
    return job


class JobStore:
    """Job records in Redis. ``redis`` is a ``redis.asyncio.Redis`` that
    decodes responses; ``ttl_s`` is how long finished jobs are kept."""

    def __init__(self, redis: Any, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._transition = redis.register_script(_TRANSITION)
        self._create = redis.register_script(_CREATE)

    async def create(self, job_id: str, owner: str, fields: Mapping[str, Any],
                     idempotency_key: str | None = None) -> tuple[str, bool]:
        """Record a new queued job. Returns ``(job_id, created)``: with an
        idempotency key already used by this owner, the earlier job's id and
        False."""
        now = time.time()
        record = {**fields, "id": job_id, "owner": owner, "state": JobState.QUEUED.value,
                  "created_at": now, "updated_at": now, "idempotency_key": idempotency_key}
        idem = keys.idempotency(owner, idempotency_key) if idempotency_key else ""
        got = await self._create(
            keys=[keys.job(job_id), keys.owner_jobs(owner), keys.all_jobs(),
                  keys.job_index(JobState.QUEUED.value), idem],
            args=[job_id, now, self.ttl_s, *_flat(record)])
        return got, got == job_id

    async def transition(self, job_id: str, state: str | None, fields: Mapping[str, Any] | None = None,
                         now: float | None = None) -> str:
        """Move a job to ``state`` (None: only update fields of an unfinished
        job). Returns MOVED, UPDATED, REFUSED (not allowed from the current
        state) or MISSING."""
        now = time.time() if now is None else now
        allowed = [s for s, nexts in TRANSITIONS.items() if state in nexts]
        return str(await self._transition(
            keys=[keys.job(job_id), *(keys.job_index(s) for s in STATES)],
            args=[job_id, state or "", ",".join(allowed), now, self.ttl_s,
                  *_flat({**(fields or {}), "updated_at": now})]))

    async def get(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(keys.job(job_id))
        return decode(raw) if raw else None

    async def delete(self, job_id: str, owner: str, idempotency_key: str | None = None) -> None:
        """Forget a job whose submission failed before it reached the cluster."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.job(job_id))
            pipe.zrem(keys.owner_jobs(owner), job_id)
            pipe.zrem(keys.all_jobs(), job_id)
            for state in STATES:
                pipe.zrem(keys.job_index(state), job_id)
            if idempotency_key:
                pipe.delete(keys.idempotency(owner, idempotency_key))
            await pipe.execute()

    async def page(self, owner: str | None, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Newest first: one owner's jobs, or every job with ``owner=None``.
        Expired jobs are dropped from the index as they are met."""
        index = keys.owner_jobs(owner) if owner is not None else keys.all_jobs()
        ids = await self.redis.zrevrange(index, offset, offset + limit - 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            raws = await pipe.execute() if ids else []
        gone = [job_id for job_id, raw in zip(ids, raws) if not raw]
        if gone:
            await self.redis.zrem(index, *gone)
        total = await self.redis.zcard(index)
        return [decode(raw) for raw in raws if raw], int(total)

    async def counts(self) -> dict[str, int]:
        """Jobs per state; finished ones only within the TTL."""
        cutoff = time.time() - self.ttl_s
        async with self.redis.pipeline(transaction=False) as pipe:
            for state in TERMINAL:
                pipe.zremrangebyscore(keys.job_index(state), "-inf", cutoff)
            for state in STATES:
                pipe.zcard(keys.job_index(state))
            got = await pipe.execute()
        return {state: int(n) for state, n in zip(STATES, got[len(TERMINAL):])}
