"""OpenAI batches as BitingLip jobs.

A batch *is* a REST job (same record in the job store, same output folder,
progress, cancel, resume, tenant isolation): its id is ``batch_`` + the job's
id.  Beside the job it keeps a small record (endpoint, input file, what the
file check found, and once finalized the output and error files) in Redis
and as ``_openai_batch.json`` in the job's folder, read back should Redis lose it.

Status comes from the job, with OpenAI's words: ``validating`` until the
cluster holds the job (the file is checked and handed over), ``in_progress``
while it is queued or running there; when it has ended, the first read of
the batch writes its output and error files (:mod:`.finalize`; one gateway
at a time, under a lock in Redis) and the batch is ``completed``, ``failed``
or ``cancelled``.  In between a read sees ``finalizing`` (or ``cancelling``).

A resume of the batch's job (``POST /v1/jobs/{id}/resume``: OpenAI has no
resume) reopens the batch: :func:`reopened` drops what the finalization
wrote, and the batch follows its job again to a new finalization.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from bitinglip import redis_keys as keys
from bitinglip.atomic import write_json_atomically
from bitinglip.errors import NotFoundError
from bitinglip.platform.jobs import JOB_ID, TERMINAL, JobState, read_json

#: the batch's record, beside its job's output
RECORD = "_openai_batch.json"
PREFIX = "batch_"
#: seconds a finalizing gateway holds its lock (a gateway that died holding it is replaced after this)
FINALIZE_LOCK_S = 120
#: seconds after a cancel before the files are written: a partition in its last micro-batch may still commit
CANCEL_SETTLE_S = 2.0
#: a batch file's own timestamps (OpenAI's ``expires_at``): the completion window, here only a label
WINDOW_S = 24 * 3600

_JSON_FIELDS = ("metadata", "errors", "usage")
_NUMBERS = ("created_at", "in_progress_at", "finalizing_at", "finalized_at", "lines", "rows", "rejected", "completed",
            "failed", "cancelled_at", "output_expires_after_s", "rows_reused")
#: what a finalization (or a cancel) adds to a record; a resume takes it away again
_ENDING = ("final_status", "finalizing_at", "finalized_at", "output_file_id", "error_file_id", "completed", "failed",
           "errors", "cancelled_at", "usage", "rows_reused")
#: the error code of a batch whose job failed (any other code: its file failed the check, and nothing ran)
JOB_FAILED = "job_failed"


def job_id_of(batch_id: str) -> str | None:
    job_id = batch_id.removeprefix(PREFIX)
    return job_id if batch_id.startswith(PREFIX) and JOB_ID.fullmatch(job_id) else None


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(raw)
    for name in _JSON_FIELDS:
        if name in out:
            out[name] = json.loads(out[name])
    for name in _NUMBERS:
        if name in out:
            out[name] = float(out[name])
    return out


def _flat(record: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) if k in _JSON_FIELDS else str(v) for k, v in record.items() if v is not None}


class BatchStore:
    """Batch records: a Redis hash per batch (keyed by its job id), a sorted
    set per owner, and the same record on disk beside the job's output."""

    def __init__(self, redis: Any, results_dir: Path, ttl_s: int) -> None:
        self.redis = redis
        self.results_dir = Path(results_dir)
        self.ttl_s = ttl_s

    def _disk(self, job_id: str) -> str:
        return os.path.join(self.results_dir, job_id, RECORD)

    async def save(self, record: dict[str, Any], index: bool = False) -> None:
        write_json_atomically(self._disk(record["job_id"]), record)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.openai_batch(record["job_id"]), mapping=_flat(record))
            if index:
                pipe.zadd(keys.openai_batches(record["owner"]), {record["job_id"]: float(record["created_at"])})
            if record.get("finalized_at"):  # as long as the job's own record lasts
                pipe.expire(keys.openai_batch(record["job_id"]), self.ttl_s)
            await pipe.execute()

    async def reopen(self, record: dict[str, Any]) -> None:
        """Write :func:`reopened`'s record in place of the finalized one (the
        fields it lacks go, and so does the TTL of a finished batch)."""
        record = reopened(record)
        write_json_atomically(self._disk(record["job_id"]), record)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.openai_batch(record["job_id"]))
            pipe.hset(keys.openai_batch(record["job_id"]), mapping=_flat(record))
            await pipe.execute()

    async def get(self, owner: str, batch_id: str) -> dict[str, Any]:
        """The caller's batch; someone else's is as absent as a missing one.
        A record Redis lost is read back from the job's folder and restored."""
        job_id = job_id_of(batch_id)
        record: dict[str, Any] | None = None
        if job_id is not None:
            raw = await self.redis.hgetall(keys.openai_batch(job_id))
            record = _decode(raw) if raw else read_json(self._disk(job_id))
            if record is not None and not raw and record.get("owner") == owner:
                await self.save(record, index=True)
        if record is None or record.get("owner") != owner:
            raise NotFoundError(f"no batch {batch_id!r}")
        return record

    async def of_job(self, job_id: str) -> dict[str, Any] | None:
        """The record of the batch run as job ``job_id`` (its owner checked by
        the caller), or None if the job is not a batch's."""
        raw = await self.redis.hgetall(keys.openai_batch(job_id))
        return _decode(raw) if raw else read_json(self._disk(job_id))

    async def page(self, owner: str, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """The owner's batches, newest first, after the cursor ``after``."""
        ids = await self.redis.zrevrange(keys.openai_batches(owner), 0, -1)
        if after is not None:
            job_id = job_id_of(after)
            ids = ids[ids.index(job_id) + 1:] if job_id in ids else []
        found = []
        for job_id in ids[:limit + 1]:
            raw = await self.redis.hgetall(keys.openai_batch(job_id))
            if raw:
                found.append(_decode(raw))
        return found[:limit], len(found) > limit

    async def lock(self, job_id: str) -> bool:
        return bool(await self.redis.set(keys.openai_finalizing(job_id), "1", nx=True, ex=FINALIZE_LOCK_S))

    async def unlock(self, job_id: str) -> None:
        await self.redis.delete(keys.openai_finalizing(job_id))

    async def lock_within(self, job_id: str, timeout: float) -> bool:
        """:meth:`lock`, waiting up to ``timeout`` seconds for a finalization under way to end."""
        deadline = time.monotonic() + timeout
        while not await self.lock(job_id):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True


def check_failed(record: dict[str, Any]) -> bool:
    """Whether the batch failed its file check (nothing ran, nothing to resume)."""
    return any(e.get("code") != JOB_FAILED for e in record.get("errors") or ())


def reopened(record: dict[str, Any]) -> dict[str, Any]:
    """The record of a batch whose job is resumed: in progress again, without
    the files, counts and stamps of its earlier end (its files are written
    anew, under the same ids, when the resumed job ends)."""
    return {k: v for k, v in record.items() if k not in _ENDING}


def status(record: dict[str, Any], job: dict[str, Any] | None) -> str:
    """The batch's OpenAI status, from its record and its job's state."""
    if record.get("errors"):
        return "failed"
    if record.get("final_status"):
        return str(record["final_status"])
    state = job["state"] if job is not None else None
    if state == JobState.CANCELLED.value:
        return "cancelling"
    if state in TERMINAL:
        return "finalizing"
    if state == JobState.QUEUED.value and job is not None and job.get("parts") is None:
        return "validating"  # the gateway records ``parts`` once the cluster holds the job
    return "in_progress"


def final_status(job: dict[str, Any]) -> str:
    return {JobState.SUCCEEDED.value: "completed", JobState.CANCELLED.value: "cancelled"}.get(job["state"], "failed")


def due(record: dict[str, Any], job: dict[str, Any] | None, now: float) -> bool:
    """Whether the batch's files are to be written now."""
    if record.get("errors") or record.get("final_status") or job is None or job["state"] not in TERMINAL:
        return False
    if job["state"] == JobState.CANCELLED.value:
        return now - float(job.get("finished_at") or 0) >= CANCEL_SETTLE_S
    return True


def _stamp(value: Any) -> int | None:
    return None if value is None else int(float(value))


def view(record: dict[str, Any], job: dict[str, Any] | None) -> dict[str, Any]:
    """The batch as OpenAI's ``Batch`` object."""
    shown = status(record, job)
    created = float(record["created_at"])
    lines, rejected = int(record.get("lines") or 0), int(record.get("rejected") or 0)
    if record.get("final_status") or record.get("errors"):
        completed, failed = int(record.get("completed") or 0), int(record.get("failed") or 0)
    else:  # running: the job counts rows; a line of several inputs is several rows
        rows = int(record.get("rows") or 0)
        done = int((job or {}).get("rows_done") or 0)
        completed = min(lines - rejected, done * (lines - rejected) // rows) if rows else 0
        failed = rejected
    # rows taken from the result store, as requests (a line of several inputs is several rows)
    rows_reused = int(record.get("rows_reused") or (job or {}).get("rows_reused") or 0)
    rows = int(record.get("rows") or 0)
    reused = min(completed, rows_reused * (lines - rejected) // rows) if rows else 0
    finished = (job or {}).get("finished_at")
    finalized = record.get("finalized_at")
    errors = record.get("errors") or None
    # a record from before these stamps were kept: the batch went in progress as it was created
    started = None if shown == "validating" or check_failed(record) else record.get("in_progress_at") or created
    return {
        "id": PREFIX + record["job_id"], "object": "batch", "endpoint": record["endpoint"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": record["input_file_id"], "completion_window": record["completion_window"],
        "status": shown, "output_file_id": record.get("output_file_id"),
        "error_file_id": record.get("error_file_id"), "created_at": int(created),
        "in_progress_at": _stamp(started), "expires_at": int(created + WINDOW_S),
        "finalizing_at": _stamp(record.get("finalizing_at") or finished) if shown in ("finalizing", "completed")
        else None,
        "completed_at": _stamp(finalized) if shown == "completed" else None,
        "failed_at": _stamp(finalized or created) if shown == "failed" else None,
        "expired_at": None,
        "cancelling_at": _stamp(record.get("cancelled_at") or finished) if shown in ("cancelling", "cancelled")
        else None,
        "cancelled_at": _stamp(finalized) if shown == "cancelled" else None,
        # "reused" is ours: the official clients keep a field they do not know (``request_counts.reused``)
        "request_counts": {"total": lines, "completed": completed, "failed": failed, "reused": reused},
        "metadata": record.get("metadata"), "model": record.get("model"), "usage": _usage(record.get("usage")),
    }


def _usage(tokens: dict[str, int] | None) -> dict[str, Any] | None:
    """OpenAI's ``BatchUsage`` from the tokens a finalization counted (None before it)."""
    if not tokens:
        return None
    done_in, done_out = int(tokens["input_tokens"]), int(tokens["output_tokens"])
    return {"input_tokens": done_in, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": done_out,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": done_in + done_out}


def new_record(job_id: str, owner: str, body: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    return {"job_id": job_id, "owner": owner, "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
            "completion_window": body["completion_window"], "metadata": body.get("metadata"),
            # checked by the route; the output and error files expire this long after they are written
            "output_expires_after_s": (body.get("output_expires_after") or {}).get("seconds"),
            "created_at": time.time() if now is None else now}
