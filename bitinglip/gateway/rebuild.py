"""Job records rebuilt from the results directory when Redis lost them.

The scheduler plugin writes back the jobs it follows and the finished ones it
remembers; this covers the finished jobs it has forgotten (a new scheduler,
or a job older than its memory).  Each REST job's output directory holds
:data:`REST_RECORD` (the hash the gateway created: owner, task, model name,
priority, ...), ``_job.json`` (rows, partitions) and, once the job has ended,
``_manifest.json`` (its state).  A job without a manifest is left to the
plugin: only the cluster knows how far it got.

Every gateway runs :func:`watch`: at start and whenever the dataset stamp
is gone or changed it restores what is missing, never overwriting a record.
It also ends the jobs that a gateway recorded but died before handing to the
cluster (:func:`sweep_abandoned`): nothing else would ever move them out of
``queued``, and a retry with the same idempotency key would find them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import anyio

from bitinglip.atomic import write_json_atomically
from bitinglip.platform.jobs import MANIFEST, MOVED, RECORD, TERMINAL, JobState, JobStore, job_keys, read_json

log = logging.getLogger("bitinglip.gateway")

#: the job hash as the gateway created it, kept beside the job's output
REST_RECORD = "_rest.json"
#: the job's inputs (inline rows, or the input file's path) and text column, for a resume
REST_INPUTS = "_rest_inputs.json"
#: how often a gateway looks at the dataset stamp
CHECK_S = 1.0
#: how often a gateway looks for abandoned submissions
SWEEP_S = 30.0
#: a queued job without partitions this long after creation was never handed over
ABANDONED_S = 300.0
ABANDONED_ERROR = ("the gateway that accepted this job stopped before the cluster took it; "
                   "nothing ran: submit it again (with a new idempotency key)")


def write_rest_record(output: str, record: dict[str, Any], name: str = REST_RECORD) -> None:
    os.makedirs(output, exist_ok=True)
    write_json_atomically(os.path.join(output, name), record)


def finished_records(results_dir: Path, ttl_s: int, now: float) -> list[dict[str, Any]]:
    """The records of the REST jobs under ``results_dir`` that ended within
    the TTL, as their hashes held them at the end."""
    found: list[dict[str, Any]] = []
    try:
        entries = list(os.scandir(results_dir))
    except FileNotFoundError:
        return found
    for entry in entries:
        manifest_path = os.path.join(entry.path, MANIFEST)
        try:
            if not entry.is_dir() or os.stat(manifest_path).st_mtime < now - ttl_s:
                continue
            rest, manifest = read_json(os.path.join(entry.path, REST_RECORD)), read_json(manifest_path)
            job = read_json(os.path.join(entry.path, RECORD)) or {}
        except (OSError, ValueError):
            continue  # not a job's directory, or one being written
        if rest is None or manifest is None or manifest.get("state") not in TERMINAL:
            continue
        finished = float(manifest.get("finished") or now)
        found.append({**rest, "state": manifest["state"], "rows_total": job.get("rows", rest.get("rows_total")),
                      "parts": job.get("partitions"), "finished_at": finished, "updated_at": finished,
                      "rows_done": int(manifest.get("rows_out", 0)) + int(manifest.get("rows_in_error", 0)),
                      "rows_reused": int(manifest.get("rows_reused") or 0)})
    return found


async def rebuild(store: JobStore, results_dir: Path) -> int:
    """Restore the finished jobs Redis lacks; how many were written."""
    records = await anyio.to_thread.run_sync(finished_records, results_dir, store.ttl_s, time.time())
    restored = 0
    for record in records:
        restored += await store.restore(record)
    return restored


def _scheduler_knows(platform: Any, job_ids: list[str]) -> list[bool]:
    """Whether the scheduler holds a task of each job (its first partition or manifest)."""
    from bitinglip.platform.cluster import scheduler_holds_each

    return scheduler_holds_each(platform.client, [job_keys(job_id, 1) for job_id in job_ids])


async def sweep_abandoned(store: JobStore, platform: Any, now: float | None = None) -> list[str]:
    """Fail the queued jobs that no gateway finished submitting: the
    gateway records ``parts`` once the cluster holds a job, so a queued job
    without them, older than :data:`ABANDONED_S`, whose tasks the scheduler
    does not know, was lost between the record and the hand-over."""
    now = time.time() if now is None else now
    stale = [job for job in await store.queued_since(now - ABANDONED_S) if job.get("parts") is None]
    if not stale:
        return []
    known = await anyio.to_thread.run_sync(_scheduler_knows, platform, [job["id"] for job in stale])
    failed = []
    for job, held in zip(stale, known):
        if not held and await store.transition(job["id"], JobState.FAILED.value,
                                               {"error": ABANDONED_ERROR, "finished_at": now}, now=now) == MOVED:
            failed.append(job["id"])
    if failed:
        log.warning("failed %d job(s) abandoned before the cluster took them: %s", len(failed), ", ".join(failed))
    return failed


async def watch(store: JobStore, results_dir: Path, platform: Any = None) -> None:
    """Rebuild at start, then whenever Redis has lost its data; every
    :data:`SWEEP_S`, end abandoned submissions; until cancelled."""
    seen, failing = "", False
    swept = 0.0
    while True:
        if platform is not None and time.monotonic() - swept >= SWEEP_S:
            swept = time.monotonic()
            try:
                await sweep_abandoned(store, platform)
            except Exception:  # Redis or the scheduler away: next round
                log.warning("cannot look for abandoned jobs; retrying in %.0f s", SWEEP_S, exc_info=True)
        try:
            if await store.dataset_changed(seen):
                seen = await store.mark_dataset()
                try:
                    restored = await rebuild(store, results_dir)
                except BaseException:
                    seen = ""
                    raise
                if restored:
                    log.warning("restored %d finished job records from %s", restored, results_dir)
            failing = False
        except Exception:  # Redis down: the requests say so; look again soon
            if not failing:
                log.warning("cannot check Redis for lost job records; retrying", exc_info=True)
            failing = True
        await asyncio.sleep(CHECK_S)
