"""Job routes: submit, list, status, cancel, progress events.

A submission is recorded in Redis first, then handed to the cluster with
``fire_and_forget``, so it runs to its end whatever happens to this
process; its status and progress reach Redis from the scheduler plugin.
Every REST job writes Parquet under ``BITINGLIP_RESULTS_DIR``.  The job's
id travels with its tasks (for the plugin, which reads the record from
Redis), and the record lies beside its output (for
:mod:`bitinglip.gateway.rebuild`), so Redis can lose it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from bitinglip.errors import ConflictError, InputError, NotFoundError
from bitinglip.gateway.body import check_task, check_texts, query_int, read_json
from bitinglip.gateway.handover import submit
from bitinglip.gateway.job_view import view
from bitinglip.gateway.ratelimit import WRITE
from bitinglip.gateway.schemas import IDEMPOTENCY_KEY_PATTERN, JobRequest, parse
from bitinglip.gateway.state import Gateway
from bitinglip.platform.jobs import MOVED, TERMINAL, JobState, new_job_id
from bitinglip.platform.tasks import job_text_column
from bitinglip.settings import Settings

IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
EVENTS_POLL_S = 0.5
EVENTS_HEARTBEAT_S = 15.0


def _input_path(uri: str, settings: Settings) -> str:
    if settings.input_dir is None:
        raise InputError("input URIs are disabled on this gateway (BITINGLIP_INPUT_DIR is not set); send inputs inline")
    if "\x00" in uri:
        raise InputError("input_uri must be a file:// URI or a path")
    path = Path(uri.removeprefix("file://"))
    resolved = (settings.input_dir / path).resolve()
    if not resolved.is_relative_to(settings.input_dir):
        raise InputError(f"input_uri must point into the input directory {str(settings.input_dir)!r}")
    return str(resolved)


def parse_submission(body: dict[str, Any], settings: Settings, header_key: str | None) -> dict[str, Any]:
    job = parse(JobRequest, body)
    options = check_task(job.task, job.options)
    inputs: Any = (check_texts(job.inputs, settings.max_job_rows, settings.max_text_chars, "inputs")
                   if job.inputs is not None else _input_path(job.input_uri or "", settings))
    key = job.idempotency_key if job.idempotency_key is not None else header_key
    if key is not None and not IDEMPOTENCY_KEY.match(key):  # the header's: the body's passed its pattern
        raise InputError("idempotency_key must be 1-128 letters, digits or . _ : -")
    return {"task": job.task, "model": job.model, "inputs": inputs, "options": options,
            "priority": job.priority, "idempotency_key": key, "text_column": job_text_column(job.text_column)}


async def submit_job(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write", WRITE)
    sub = parse_submission(await read_json(request), gw.settings, request.headers.get("idempotency-key"))
    model = await gw.listed_model(sub["model"])
    job_id = new_job_id()
    output = str(gw.settings.results_dir / job_id)
    fields = {"task": sub["task"], "model": sub["model"], "priority": sub["priority"], "output": output,
              "options": sub["options"],
              "rows_total": len(sub["inputs"]) if isinstance(sub["inputs"], list) else None}
    now = time.time()
    got, created = await gw.store.create(job_id, principal.sub, fields, sub["idempotency_key"], now=now)
    if not created:
        job = await gw.store.get(got)
        if job is None or job.get("owner") != principal.sub:  # never name a job that is not the caller's
            raise NotFoundError("the job submitted under this idempotency key is gone; submit with a new key")
        return gw.json(request, view(job), 202, {"Location": f"/v1/jobs/{got}", "Idempotent-Replayed": "true"})
    record = {**fields, "id": job_id, "owner": principal.sub, "state": JobState.QUEUED.value, "created_at": now,
              "updated_at": now, "idempotency_key": sub["idempotency_key"]}
    await submit(gw, job_id, sub, model, output, record,
                 undo=lambda: gw.store.delete(job_id, principal.sub, sub["idempotency_key"]))
    current = await gw.store.get(job_id)
    return gw.json(request, view(current or {"id": job_id, "state": "queued"}), 202,
                   {"Location": f"/v1/jobs/{job_id}"})


async def list_jobs(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:read")
    return await _page(request, gw, principal.sub)


async def admin_list_jobs(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "admin")
    owner = request.query_params.get("owner")
    return await _page(request, gw, owner or None, admin=True)


async def _page(request: Request, gw: Gateway, owner: str | None, admin: bool = False) -> Response:
    offset = query_int(request, "offset", 0, 0, 1_000_000)
    limit = query_int(request, "limit", 50, 1, 500)
    jobs, total = await gw.store.page(owner, offset, limit)
    nxt = offset + limit if offset + limit < total else None
    return gw.json(request, {"jobs": [view(j, admin) for j in jobs], "offset": offset, "limit": limit,
                             "total": total, "next_offset": nxt})


async def get_job(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:read")
    return gw.json(request, view(await gw.own_job(principal, request.path_params["job_id"])))


async def cancel_job(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write")
    job = await gw.own_job(principal, request.path_params["job_id"])
    outcome = await gw.store.transition(job["id"], JobState.CANCELLED.value, {"finished_at": time.time()})
    if outcome != MOVED:
        current = await gw.store.get(job["id"])
        raise ConflictError(f"job {job['id']} is {(current or job)['state']}; only queued or running jobs can be "
                            "cancelled")
    await anyio.to_thread.run_sync(lambda: gw.platform.cancel_job(
        job["id"], int(job.get("parts", 0)), job.get("output"), reason="cancelled through the REST API"))
    return gw.json(request, view(await gw.store.get(job["id"]) or {**job, "state": "cancelled"}), 202)


async def job_events(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:read")
    job = await gw.own_job(principal, request.path_params["job_id"])

    async def stream() -> AsyncIterator[str]:
        last: dict[str, Any] | None = None
        quiet_since = time.monotonic()
        current: dict[str, Any] | None = job
        while current is not None:
            shown = view(current)
            key = {k: shown[k] for k in ("state", "rows_done", "rows_total", "error")}
            if key != last:
                last, quiet_since = key, time.monotonic()
                yield f"event: progress\ndata: {json.dumps(shown)}\n\n"
            elif time.monotonic() - quiet_since > EVENTS_HEARTBEAT_S:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            if current["state"] in TERMINAL:
                yield f"event: end\ndata: {json.dumps(shown)}\n\n"
                return
            await asyncio.sleep(EVENTS_POLL_S)
            current = await gw.store.get(job["id"])
        yield "event: end\ndata: {\"state\": \"expired\"}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **getattr(request.state, "ratelimit", {})})
