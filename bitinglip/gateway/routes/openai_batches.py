"""OpenAI's Batches: create from an uploaded file, retrieve, list, cancel.

A batch is a REST job underneath (:mod:`bitinglip.gateway.openai.batches`):
the file is checked line by line into the job's input (a file that cannot
run fails the batch with its line numbers; a line with a bad body goes to the
error file), then handed to the cluster like ``POST /v1/jobs``.  Creating one
counts once against the submission rate limit; ``metadata.idempotency_key``
returns the first batch made with it instead of running the file again.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from bitinglip.errors import ConflictError, UnknownModelError
from bitinglip.gateway.body import query_int, read_json
from bitinglip.gateway.handlers import scrub
from bitinglip.gateway.handover import submit
from bitinglip.gateway.openai.batches import PREFIX, BatchStore, due, final_status, new_record, view
from bitinglip.gateway.openai.batchfile import (
    INPUT,
    Checked,
    check_embeddings,
    check_generation,
    generation_frame,
    model_width,
)
from bitinglip.gateway.openai.bodies import BatchRequest
from bitinglip.gateway.openai.files import FileStore, content_path, ensure_folder, size_and_lines_record
from bitinglip.gateway.openai.finalize import write_files
from bitinglip.gateway.openai.shapes import ENDPOINTS
from bitinglip.gateway.ratelimit import WRITE
from bitinglip.gateway.schemas import IDEMPOTENCY_KEY_PATTERN, parse, refuse
from bitinglip.gateway.state import Gateway
from bitinglip.platform.jobs import MOVED, RECORD, TERMINAL, JobState, new_job_id
from bitinglip.platform.tasks import DEFAULT_PRIORITY

IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_IDEM_SPACE = "batch:"  # a batch's key never meets a REST job's key of the same text

log = logging.getLogger(__name__)


def _stores(gw: Gateway) -> tuple[BatchStore, FileStore]:
    return (BatchStore(gw.store.redis, gw.settings.results_dir, gw.settings.job_ttl_s),
            FileStore(gw.store.redis, gw.settings.results_dir))


def _check_body(body: dict[str, Any]) -> str | None:
    """The body's idempotency key, once the body passes."""
    metadata = parse(BatchRequest, body).metadata
    key = (metadata or {}).get("idempotency_key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise refuse("metadata.idempotency_key must be 1-128 letters, digits or . _ : -", "metadata")
    return key


async def create_batch(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write", WRITE)
    body = await read_json(request)
    key = _check_body(body)
    batches, files = _stores(gw)
    source = await files.get(principal.sub, body["input_file_id"])
    if source.get("purpose") != "batch":
        raise refuse(f"file {body['input_file_id']} has purpose {source.get('purpose')}; a batch reads purpose=batch",
                     "input_file_id")
    job_id, now = new_job_id(), time.time()
    output = str(gw.settings.results_dir / job_id)
    fields = {"task": ENDPOINTS[body["endpoint"]], "priority": DEFAULT_PRIORITY, "output": output, "options": {}}
    got, created = await gw.store.create(job_id, principal.sub, fields, key and _IDEM_SPACE + key, now=now)
    if not created:  # the same key again: the first batch, whatever became of it
        record = await batches.get(principal.sub, PREFIX + got)
        return gw.json(request, view(record, await gw.store.get(got)))
    try:
        record = await _start(gw, principal.sub, body, job_id, output, fields, key, now)
    except BaseException:
        _discard(output)  # first, and without awaiting: a cancelled request goes no further than its next await
        await gw.store.delete(job_id, principal.sub, key and _IDEM_SPACE + key)
        raise
    return gw.json(request, view(record, await gw.store.get(job_id)))


def _discard(output: str) -> None:
    """Remove the folder of a batch whose creation failed, unless the cluster
    took its job (its record is there): its workers write into it."""
    if not os.path.exists(os.path.join(output, RECORD)):
        shutil.rmtree(output, ignore_errors=True)


async def _start(gw: Gateway, owner: str, body: dict[str, Any], job_id: str, output: str,
                 fields: dict[str, Any], key: str | None, now: float) -> dict[str, Any]:
    """Check the file, then hand its job to the cluster (or fail the batch)."""
    batches, _ = _stores(gw)
    path = content_path(gw.settings.results_dir, body["input_file_id"])

    checker = functools.partial(check_generation, max_schemas=gw.settings.batch_max_schemas)
    if body["endpoint"] == "/v1/embeddings":  # a dimensions past the model's width is refused line by line
        checker = functools.partial(check_embeddings, width=functools.partial(model_width, settings=gw.settings))

    def check() -> Checked:
        with open(path, "rb") as src:
            return checker(src, output, body["endpoint"], gw.settings.batch_max_lines, gw.settings.max_text_chars)

    checked = await anyio.to_thread.run_sync(check, limiter=gw.submissions)
    model = None
    if checked.model is not None and not checked.errors:
        try:
            model = await gw.listed_model(checked.model)
        except UnknownModelError as exc:
            checked.fail("invalid_model", f"line {checked.model_line}: {exc}", checked.model_line, "body.model")
    record = {**new_record(job_id, owner, body, now), "model": checked.model, "lines": checked.lines,
              "rows": checked.rows, "rejected": checked.rejected}
    if checked.errors:
        await gw.store.transition(job_id, JobState.FAILED.value, {
            "finished_at": time.time(), "model": checked.model,
            "error": f"the batch file failed its check: {checked.errors[0]['message']}"})
        record.update(errors=checked.errors, completed=0, failed=checked.lines, final_status="failed",
                      finalized_at=time.time())
        await batches.save(record, index=True)
        return record
    # checked: handed to the cluster from here on (the batch says validating until the cluster holds the job)
    record["in_progress_at"] = time.time()
    await batches.save(record, index=True)
    if checked.rows == 0:  # every line refused for its body: nothing to run, the error file says why
        await gw.store.transition(job_id, JobState.SUCCEEDED.value, {"finished_at": time.time(), "model": checked.model,
                                                                     "rows_total": 0, "parts": 0})
        # written now: with no job folder to rebuild its record from, a later read could not tell it ended
        return await finalize(gw, record, {"id": job_id, "state": JobState.SUCCEEDED.value})
    sub = {"task": fields["task"], "priority": DEFAULT_PRIORITY, "options": checked.options, "inputs": os.path.join(output, INPUT),
           "text_column": "text", "input_root": output}
    if fields["task"] == "generate":
        sub["frame"] = await anyio.to_thread.run_sync(generation_frame, sub["inputs"], limiter=gw.submissions)
    rest = {**fields, "options": checked.options, "model": checked.model, "id": job_id, "owner": owner, "state": JobState.QUEUED.value,
            "created_at": now, "updated_at": now, "idempotency_key": key and _IDEM_SPACE + key}
    await submit(gw, job_id, sub, model, output, rest, extra={"model": checked.model, "options": checked.options})
    return record


async def finalize(gw: Gateway, record: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Write the ended batch's output and error files, once (under a lock:
    another gateway reading the batch meanwhile sees it finalizing)."""
    batches, files = _stores(gw)
    job_id = record["job_id"]
    if not await batches.lock(job_id):
        return record
    try:
        # read again under the lock: a resume (which takes it too) may have reopened the job since
        job = await gw.store.get(job_id) or job
        record = await batches.of_job(job_id) or record
        if record.get("final_status") or record.get("errors") or job["state"] not in TERMINAL:
            return record
        record = {**record, "finalizing_at": time.time()}  # what another reader sees meanwhile
        await batches.save(record)
        folder = ensure_folder(gw.settings.results_dir)
        out_id, err_id = f"file-{job_id}-output", f"file-{job_id}-errors"
        out_path, err_path = folder / f"{out_id}.jsonl", folder / f"{err_id}.jsonl"
        if job["state"] == JobState.CANCELLED.value:
            not_run = ("batch_cancelled", "the batch was cancelled before this request ran")
        else:
            not_run = ("batch_failed", f"the batch's job failed before this request ran: {scrub(job.get('error') or '')}")
        try:
            outcome = await anyio.to_thread.run_sync(write_files, str(gw.settings.results_dir / job_id), job_id,
                                                     record["endpoint"], record.get("model") or "", str(out_path),
                                                     str(err_path), not_run)
        except OSError:  # the disk (full, unmounted): the next read tries again
            raise
        except Exception as exc:  # a job's data that cannot be read must not fail every read
            log.exception("batch %s%s: its files cannot be written", PREFIX, job_id)
            record = {**record, "errors": [{"code": "finalize_failed", "line": None, "param": None, "message":
                                            f"the batch's output could not be read back: {type(exc).__name__}"}],
                      "completed": 0, "failed": int(record.get("lines") or 0), "final_status": "failed",
                      "finalized_at": time.time()}
            await batches.save(record)
            return record
        expires_after_s = int(record["output_expires_after_s"]) if record.get("output_expires_after_s") else None
        for file_id, path, name in ((out_id, out_path, "output"), (err_id, err_path, "errors")):
            await files.add(await anyio.to_thread.run_sync(size_and_lines_record, file_id, record["owner"], str(path),
                                                           f"batch_{job_id}_{name}.jsonl", expires_after_s))
        record = {**record, "output_file_id": out_id, "error_file_id": err_id if outcome.failed else None,
                  "completed": outcome.completed, "failed": outcome.failed, "final_status": final_status(job),
                  "usage": {"input_tokens": outcome.input_tokens, "output_tokens": outcome.output_tokens},
                  "rows_reused": int(job.get("rows_reused") or 0),
                  "finalized_at": time.time()}
        if job["state"] == JobState.FAILED.value:
            record["errors"] = [{"code": "job_failed", "message": scrub(job.get("error") or "the job failed"),
                                 "line": None, "param": None}]
        await batches.save(record)
        return record
    finally:
        await batches.unlock(job_id)


async def _current(gw: Gateway, record: dict[str, Any]) -> dict[str, Any]:
    job = await gw.store.get(record["job_id"])
    if due(record, job, time.time()):
        assert job is not None
        record = await finalize(gw, record, job)
    return view(record, job)


async def get_batch(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:read")
    batches, _ = _stores(gw)
    return gw.json(request, await _current(gw, await batches.get(principal.sub, request.path_params["batch_id"])))


async def list_batches(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:read")
    limit = query_int(request, "limit", 20, 1, 100)
    batches, _ = _stores(gw)
    found, more = await batches.page(principal.sub, request.query_params.get("after"), limit)
    data = [await _current(gw, record) for record in found]
    return gw.json(request, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})


async def cancel_batch(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write")
    batches, _ = _stores(gw)
    record = await batches.get(principal.sub, request.path_params["batch_id"])
    job = await gw.store.get(record["job_id"])
    if record.get("final_status") or job is None:
        raise ConflictError(f"batch {PREFIX}{record['job_id']} has ended; only a batch in progress can be cancelled")
    outcome = await gw.store.transition(job["id"], JobState.CANCELLED.value, {"finished_at": time.time()})
    if outcome != MOVED:
        raise ConflictError(f"batch {PREFIX}{record['job_id']} has ended; only a batch in progress can be cancelled")
    await anyio.to_thread.run_sync(lambda: gw.platform.cancel_job(
        job["id"], int(job.get("parts") or 0), job.get("output"), reason="batch cancelled through the OpenAI API"))
    record = {**record, "cancelled_at": time.time()}
    await batches.save(record)
    return gw.json(request, view(record, await gw.store.get(job["id"])))
