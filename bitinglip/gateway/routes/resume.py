"""``POST /v1/jobs/{id}/resume``: run a cancelled or failed REST job again,
under the same id, into the same output directory, where only the
partitions not committed there run (:meth:`Platform.submit` with the job's
id and output skips them).  The inputs come from the file the submission left
beside the output; the job's record in Redis goes back to ``queued``.

The job of an OpenAI batch resumes the batch (OpenAI has no resume of its
own): the batch is in progress again and is finalized anew when the job
ends.  A resume that cannot go ahead (its inputs changed, the cluster
refused the job) leaves the job and its batch as they were.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from bitinglip.errors import ConflictError, UnavailableError
from bitinglip.gateway.handover import submit
from bitinglip.gateway.job_view import view
from bitinglip.gateway.openai.batches import PREFIX, BatchStore, check_failed
from bitinglip.gateway.openai.batchfile import generation_frame
from bitinglip.gateway.ratelimit import WRITE
from bitinglip.gateway.rebuild import REST_INPUTS
from bitinglip.gateway.state import Gateway
from bitinglip.platform.jobs import MISSING, MOVED, RECORD, JobState, fingerprint, job_keys, read_json
from bitinglip.platform.tasks import DEFAULT_PRIORITY
from bitinglip.polling import poll

#: the states a job may be resumed from: it ended without all of its rows
RESUMABLE = (JobState.CANCELLED.value, JobState.FAILED.value)
#: seconds to wait for the stopped run's tasks to leave the cluster
SETTLE_S = 30.0


def settled(platform: Any, job_id: str, parts: int) -> bool:
    """Whether no worker and not the scheduler still holds a task of the
    job's earlier run: a cancelled partition stops only at its next
    micro-batch, and a new task under its key must not meet it."""
    from bitinglip.platform.cluster import cluster_holds_any

    keys = job_keys(job_id, parts)
    return poll(lambda: not cluster_holds_any(platform.client, keys), timeout=SETTLE_S, interval=0.1)


def _same_inputs(output: str, inputs: Any) -> bool:
    """Whether ``inputs`` are the ones the job ran on (the fingerprint in its
    record; :meth:`Platform.submit` refuses a resume whose inputs differ)."""
    ran = read_json(os.path.join(output, RECORD))
    return ran is None or ran.get("fingerprint") == fingerprint(inputs)


def _submission(job: dict[str, Any], saved: dict[str, Any], batch: dict[str, Any] | None) -> dict[str, Any]:
    """What the job is handed to the cluster with again, exactly as the first time."""
    sub = {"task": job["task"], "priority": int(job.get("priority") or DEFAULT_PRIORITY), "options": job.get("options") or {},
           "inputs": saved["inputs"], "text_column": saved["text_column"], "input_root": saved.get("input_root")}
    if batch is not None and job["task"] == "generate":
        sub["frame"] = generation_frame(saved["inputs"])  # a chat batch ran on this frame, not on the file
    return sub


async def resume_job(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write", WRITE)
    job = await gw.own_job(principal, request.path_params["job_id"])
    if job["state"] not in RESUMABLE:
        raise ConflictError(f"job {job['id']} is {job['state']}; only cancelled or failed jobs can be resumed")
    batches = BatchStore(gw.store.redis, gw.settings.results_dir, gw.settings.job_ttl_s)
    batch = await batches.of_job(job["id"])
    if batch is not None and check_failed(batch):
        raise ConflictError(f"job {job['id']} is batch {PREFIX}{job['id']}, whose file failed its check: nothing "
                            "ran and nothing can resume; create a new batch from a corrected file")
    saved = await anyio.to_thread.run_sync(read_json, os.path.join(job["output"], REST_INPUTS))
    if saved is None:
        raise ConflictError(f"job {job['id']} kept no copy of its inputs (submitted by an older gateway); "
                            "submit it again")
    sub = await anyio.to_thread.run_sync(_submission, job, saved, batch, limiter=gw.submissions)
    if not await anyio.to_thread.run_sync(_same_inputs, job["output"], sub.get("frame", sub["inputs"]),
                                          limiter=gw.submissions):
        raise ConflictError(f"job {job['id']}'s inputs changed since it ran (its input file was modified or "
                            "replaced); submit a new job")
    if not await anyio.to_thread.run_sync(settled, gw.platform, job["id"], int(job.get("parts") or 0),
                                          limiter=gw.submissions):
        raise UnavailableError(f"job {job['id']}'s stopped run is still leaving the cluster; retry shortly",
                               retry_after=5)
    now = time.time()
    batch = await _reopen(gw, batches, job, batch is not None, now)
    record = {key: job.get(key) for key in ("task", "model", "priority", "output", "options", "rows_total", "id",
                                            "owner", "created_at", "idempotency_key")}
    record.update(state=JobState.QUEUED.value, updated_at=now, resumed_at=now)

    async def undo() -> None:  # nothing runs: the job (and its batch) end again as they were
        await gw.store.transition(job["id"], job["state"], {"finished_at": job.get("finished_at") or time.time(),
                                                            "error": job.get("error")})
        if batch is not None:
            await batches.save(batch)

    await submit(gw, job["id"], sub, job["model"], job["output"], record, undo=undo)
    current = await gw.store.get(job["id"])
    return gw.json(request, view(current or {**job, "state": "queued"}), 202, {"Location": f"/v1/jobs/{job['id']}"})


async def _reopen(gw: Gateway, batches: BatchStore, job: dict[str, Any], is_batch: bool,
                  now: float) -> dict[str, Any] | None:
    """Put the job back in the queue and, for a batch's job, the batch back
    in progress; the batch's record as it was (to put back should the resume
    fail).  Under the batch's finalizing lock, so that a finalization never
    writes the earlier run's end over the reopened batch."""
    if is_batch and not await batches.lock_within(job["id"], SETTLE_S):
        raise UnavailableError(f"batch {PREFIX}{job['id']} is writing its files; retry shortly")
    try:
        outcome = await gw.store.reopen(job["id"], RESUMABLE, now=now)
        if outcome != MOVED:  # another resume came first, or the record is gone
            raise ConflictError(f"job {job['id']} is {'gone' if outcome == MISSING else outcome}; "
                                "only cancelled or failed jobs can be resumed")
        batch = await batches.of_job(job["id"]) if is_batch else None
        if batch is not None:
            await batches.reopen(batch)
        return batch
    finally:
        if is_batch:
            await batches.unlock(job["id"])
