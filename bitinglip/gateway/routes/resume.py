"""``POST /v1/jobs/{id}/resume``: run a cancelled or failed REST job again,
under the same id, into the same output directory, where only the
partitions not committed there run (:meth:`Platform.submit` with the job's
id and output skips them).  The inputs come from the file the submission left
beside the output; the job's record in Redis goes back to ``queued``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from bitinglip.errors import BitingLipError, ConflictError, UnavailableError
from bitinglip.gateway.handover import hand_over, refusal
from bitinglip.gateway.job_view import view
from bitinglip.gateway.ratelimit import WRITE
from bitinglip.gateway.rebuild import REST_INPUTS
from bitinglip.gateway.state import Gateway
from bitinglip.platform.jobs import MISSING, MOVED, JobState, job_keys, read_json
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


async def resume_job(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write", WRITE)
    job = await gw.own_job(principal, request.path_params["job_id"])
    if job["state"] not in RESUMABLE:
        raise ConflictError(f"job {job['id']} is {job['state']}; only cancelled or failed jobs can be resumed")
    saved = await anyio.to_thread.run_sync(read_json, os.path.join(job["output"], REST_INPUTS))
    if saved is None:
        raise ConflictError(f"job {job['id']} kept no copy of its inputs (submitted by an older gateway); "
                            "submit it again")
    if not await anyio.to_thread.run_sync(settled, gw.platform, job["id"], int(job.get("parts") or 0),
                                          limiter=gw.submissions):
        raise UnavailableError(f"job {job['id']}'s stopped run is still leaving the cluster; retry shortly")
    now = time.time()
    outcome = await gw.store.reopen(job["id"], RESUMABLE, now=now)
    if outcome != MOVED:  # another resume came first, or the record is gone
        raise ConflictError(f"job {job['id']} is {'gone' if outcome == MISSING else outcome}; "
                            "only cancelled or failed jobs can be resumed")
    sub = {"task": job["task"], "priority": int(job.get("priority") or 5), "options": job.get("options") or {},
           "inputs": saved["inputs"], "text_column": saved["text_column"], "input_root": saved.get("input_root")}
    record = {key: job.get(key) for key in ("task", "model", "priority", "output", "options", "rows_total", "id",
                                            "owner", "created_at", "idempotency_key")}
    record.update(state=JobState.QUEUED.value, updated_at=now, resumed_at=now)
    try:
        total, parts = await anyio.to_thread.run_sync(hand_over, gw.platform, job["id"], sub, job["model"],
                                                      job["output"], record, limiter=gw.submissions)
    except BaseException as exc:
        # the job ends again as it was, saying why the resume failed
        await gw.store.transition(job["id"], JobState.FAILED.value,
                                  {"finished_at": time.time(), "error": f"resume failed: {type(exc).__name__}: {exc}"})
        if isinstance(exc, BitingLipError | asyncio.CancelledError):
            raise
        raise refusal(exc) from exc
    await gw.store.transition(job["id"], None, {"rows_total": total, "parts": parts})
    current = await gw.store.get(job["id"])
    return gw.json(request, view(current or {**job, "state": "queued"}), 202, {"Location": f"/v1/jobs/{job['id']}"})
