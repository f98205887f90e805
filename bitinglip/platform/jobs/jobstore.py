"""Job status in Redis: one hash per job, with explicit state transitions.

Both writers use this module: the gateway creates a job and cancels it, the
scheduler plugin (:mod:`bitinglip.platform.ops.status_plugin`) moves it through
running to its end.  Every state change runs as one Lua script that checks
the transition against :data:`TRANSITIONS`, updates the hash and the
per-state index together, and gives a finished job its TTL, so two writers
never leave the hash and the indexes disagreeing.

Redis may lose its data (a restart without persistence).  The stamp under
:func:`keys.dataset` tells the writers: when it is gone or changed, each
writes back what it knows with :meth:`JobStore.restore`, which creates a
record only where none is, so rebuilders never overwrite each other or a
newer record.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from bitinglip import redis_keys as keys
from bitinglip.platform.jobs.vocabulary import STATES, TERMINAL, TRANSITIONS, JobState

#: outcomes of :meth:`JobStore.transition`
MISSING, REFUSED, UPDATED, MOVED = "missing", "refused", "updated", "moved"


def _lua(script: str) -> str:
    """A script with the vocabulary's state lists filled in: ``{STATES}`` (a Lua
    array in STATES order), ``{TERMINAL}`` (a set: ``terminal[s]``), ``{QUEUED}``."""
    return (script.replace("{STATES}", "{" + ", ".join(f"'{s}'" for s in STATES) + "}")
            .replace("{TERMINAL}", "{" + ", ".join(f"['{s}'] = true" for s in TERMINAL) + "}")
            .replace("{QUEUED}", JobState.QUEUED.value))


# KEYS: job hash, then the state indexes in STATES order.
# ARGV: job id, new state ('' to only update fields), allowed previous states
# (comma-separated), now, ttl seconds, then field/value pairs.
_TRANSITION = _lua("""
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 'missing' end
local new = ARGV[2]
local states = {STATES}
local terminal = {TERMINAL}
local function index(s) for i, v in ipairs(states) do if v == s then return KEYS[i + 1] end end end
if new == '' or new == cur then
  if terminal[cur] then return 'refused' end
  if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
  return 'updated'
end
if not string.find(',' .. ARGV[3] .. ',', ',' .. cur .. ',', 1, true) then return 'refused' end
redis.call('HSET', KEYS[1], 'state', new)
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
redis.call('ZREM', index(cur), ARGV[1])
redis.call('ZADD', index(new), ARGV[4], ARGV[1])
if terminal[new] then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('ZREMRANGEBYSCORE', index(new), '-inf', tonumber(ARGV[4]) - tonumber(ARGV[5]))
end
return 'moved'
""")

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

# KEYS: job hash, owner index, all-jobs index, the state indexes in STATES order,
# idempotency key ('' slot if none)
# ARGV: job id, state, created_at, score in the state index, ttl (0: none), idempotency ttl,
# then field/value pairs
_RESTORE = _lua("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local states = {STATES}
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
for i, s in ipairs(states) do
  if s == ARGV[2] then redis.call('ZADD', KEYS[i + 3], ARGV[4], ARGV[1])
  else redis.call('ZREM', KEYS[i + 3], ARGV[1]) end
end
if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
local idem = KEYS[#states + 4]
if idem ~= '' then redis.call('SET', idem, ARGV[1], 'NX', 'EX', ARGV[6]) end
return 1
""")

# KEYS: job hash, then the state indexes in STATES order.
# ARGV: job id, now, states it may be reopened from (comma-separated).
_REOPEN = _lua("""
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return 'missing' end
if not string.find(',' .. ARGV[3] .. ',', ',' .. cur .. ',', 1, true) then return cur end
local states = {STATES}
for i, s in ipairs(states) do if s == cur then redis.call('ZREM', KEYS[i + 1], ARGV[1]) end end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[1], 'state', '{QUEUED}', 'updated_at', ARGV[2], 'resumed_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'finished_at', 'error')
redis.call('PERSIST', KEYS[1])
return 'moved'
""")

_INT_FIELDS = ("rows_total", "rows_done", "rows_reused", "parts", "priority")
_FLOAT_FIELDS = ("created_at", "started_at", "finished_at", "updated_at", "resumed_at")


def flat(fields: Mapping[str, Any]) -> dict[str, str]:
    """Fields as the hash holds them (None left out)."""
    return {name: json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            for name, value in fields.items() if value is not None}


def _flat(fields: Mapping[str, Any]) -> list[str]:
    return [part for item in flat(fields).items() for part in item]


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
        self._restore = redis.register_script(_RESTORE)
        self._reopen = redis.register_script(_REOPEN)

    async def create(self, job_id: str, owner: str, fields: Mapping[str, Any],
                     idempotency_key: str | None = None, now: float | None = None) -> tuple[str, bool]:
        """Record a new queued job. Returns ``(job_id, created)``: with an
        idempotency key already used by this owner, the earlier job's id and
        False."""
        now = time.time() if now is None else now
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
        return str(await self._transition(**self._transition_call(job_id, state, fields, now)))

    async def transition_and_get(self, job_id: str, state: str | None, fields: Mapping[str, Any] | None = None
                                 ) -> tuple[str, dict[str, str]]:
        """:meth:`transition`, then the job's hash as it is now (raw strings),
        in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._transition(**self._transition_call(job_id, state, fields, None), client=pipe)
            pipe.hgetall(keys.job(job_id))
            outcome, raw = await pipe.execute()
        return str(outcome), dict(raw or {})

    def _transition_call(self, job_id: str, state: str | None, fields: Mapping[str, Any] | None,
                         now: float | None) -> dict[str, Any]:
        now = time.time() if now is None else now
        allowed = [s for s, nexts in TRANSITIONS.items() if state in nexts]
        return {"keys": [keys.job(job_id), *(keys.job_index(s) for s in STATES)],
                "args": [job_id, state or "", ",".join(allowed), now, self.ttl_s,
                         *_flat({**(fields or {}), "updated_at": now})]}

    async def reopen(self, job_id: str, from_states: tuple[str, ...], now: float | None = None) -> str:
        """Put a finished job back in the queue, for a resume: only from
        ``from_states``, atomically, so two resumes never both go ahead; it
        loses its TTL again (running jobs never expire).  Returns MOVED,
        MISSING, or the state that refused it."""
        now = time.time() if now is None else now
        return str(await self._reopen(keys=[keys.job(job_id), *(keys.job_index(s) for s in STATES)],
                                      args=[job_id, now, ",".join(from_states)]))

    async def restore(self, record: Mapping[str, Any], now: float | None = None) -> bool:
        """Write back the record of a job that Redis lost, with its indexes,
        idempotency key and remaining TTL. Only where there is no record
        (True when it wrote one); a finished job past its TTL stays gone.
        ``record`` is a job hash, raw or decoded."""
        now = time.time() if now is None else now
        job_id, state, owner = str(record["id"]), str(record["state"]), str(record["owner"])
        created = float(record.get("created_at") or now)
        ttl, score = 0, created
        if state in TERMINAL:
            finished = float(record.get("finished_at") or now)
            ttl, score = int(finished + self.ttl_s - now), finished
            if ttl <= 0:
                return False
        elif state == JobState.RUNNING.value and record.get("started_at"):
            score = float(record["started_at"])
        idem_ttl = int(created + self.ttl_s - now)
        key = record.get("idempotency_key")
        idem = keys.idempotency(owner, str(key)) if key and idem_ttl > 0 else ""
        return bool(await self._restore(
            keys=[keys.job(job_id), keys.owner_jobs(owner), keys.all_jobs(),
                  *(keys.job_index(s) for s in STATES), idem],
            args=[job_id, state, created, score, ttl, max(idem_ttl, 1), *_flat(record)]))

    async def dataset_changed(self, seen: str) -> bool:
        """Whether the dataset stamp differs from ``seen`` (``""``: never seen)."""
        return bool(await self.redis.get(keys.dataset()) != seen)

    async def mark_dataset(self) -> str:
        """Stamp the dataset if nobody has since it was lost; the stamp in force."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.dataset(), uuid.uuid4().hex, nx=True)
            pipe.get(keys.dataset())
            _, stamp = await pipe.execute()
        return str(stamp)

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
        raws = await self._hashes(ids)
        gone = [job_id for job_id, raw in zip(ids, raws) if not raw]
        if gone:
            await self.redis.zrem(index, *gone)
        total = await self.redis.zcard(index)
        return [decode(raw) for raw in raws if raw], int(total)

    async def queued_since(self, before: float, limit: int = 100) -> list[dict[str, Any]]:
        """Jobs still queued that were queued before ``before``, oldest first."""
        ids = await self.redis.zrangebyscore(keys.job_index(JobState.QUEUED.value), "-inf", before, start=0, num=limit)
        raws = await self._hashes(ids)
        return [job for job in (decode(raw) for raw in raws if raw) if job.get("state") == JobState.QUEUED.value]

    async def _hashes(self, ids: list[str]) -> list[dict[str, str]]:
        """The jobs' hashes in one round trip (empty for a job that is gone)."""
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            return list(await pipe.execute())

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
