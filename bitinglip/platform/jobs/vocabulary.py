"""The words every part of BitingLip uses about a job, defined once.

A job's states and the moves between them (the Redis job store's Lua
scripts are built from these lists), the Dask key of each of its tasks and
the one parser of that key, the job-id rule, the event topics and the task
annotation the scheduler plugins listen for, and how rows/s and the ETA are
worked out from a job's figures.  Imports nothing of BitingLip: the client,
the runner on the workers, the scheduler plugins and the gateway all read it.
"""

from __future__ import annotations

import re
import uuid
from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATES: tuple[str, ...] = tuple(s.value for s in JobState)
#: a job in one of these states has ended; it never changes again (except through a resume)
TERMINAL: tuple[str, ...] = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)
#: allowed moves; a finished job never changes again, except through
#: :meth:`~bitinglip.platform.jobs.jobstore.JobStore.reopen` (a resume, asked for explicitly)
TRANSITIONS: dict[str, tuple[str, ...]] = {
    JobState.QUEUED.value: (JobState.RUNNING.value, *TERMINAL),
    JobState.RUNNING.value: TERMINAL,
    JobState.SUCCEEDED.value: (),
    JobState.FAILED.value: (),
    JobState.CANCELLED.value: (),
}

#: a job id: what ``Platform.submit(job_id=...)`` accepts; a REST job's is :func:`new_job_id`'s 32 hex digits
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: the key of the job's last task, which writes the manifest once every partition has
MANIFEST_PART = "manifest"
_TASK_KEY = re.compile(rf"^bitinglip-(?P<job>{JOB_ID.pattern})-(?P<part>\d+|{MANIFEST_PART})$")

#: the workers' progress events (``{"job", "part", "done", "total"}``), sent by the runner
PROGRESS_TOPIC = "bitinglip-progress"
#: each partition's summary (rows, errors, tokens, ...) with the job's task and model
SUMMARY_TOPIC = "bitinglip-summary"
#: a streamed online request's text as its engine produces it (``{"stream", "index", "seq", "text"}``), sent by
#: :func:`bitinglip.platform.jobs.online.predict_generation` and read by the gateway that streams it
TOKENS_TOPIC = "bitinglip-tokens"
#: the task annotation carrying a REST job's ``{"id": ...}`` (the status plugin follows only these jobs)
ANNOTATION = "bitinglip_job"

#: the shortest elapsed time a rate is worked out over, so a first event never divides by zero
_MIN_ELAPSED_S = 1e-6


def new_job_id() -> str:
    return uuid.uuid4().hex


def task_key(job_id: str, part: int | str) -> str:
    """The Dask key of a job's partition ``part`` (or of its ``"manifest"`` task)."""
    return f"bitinglip-{job_id}-{part}"


def job_keys(job_id: str, parts: int, manifest: bool = True) -> list[str]:
    """The Dask keys of a job's tasks."""
    out = [task_key(job_id, i) for i in range(parts)]
    return [*out, task_key(job_id, MANIFEST_PART)] if manifest else out


def parse_task_key(key: object) -> tuple[str, int | str] | None:
    """``(job_id, part)`` of a job's task key (``part`` an int, or ``"manifest"``);
    None for any other key."""
    match = _TASK_KEY.match(key) if isinstance(key, str) else None
    if match is None:
        return None
    part = match["part"]
    return match["job"], part if part == MANIFEST_PART else int(part)


def cancel_event_name(job_id: str) -> str:
    """The Dask ``Event`` whose setting cancels a job."""
    return f"bitinglip-cancel-{job_id}"


def rate_and_eta(done: int, total: int | None, started: float | None, end: float, state: str,
                 eta_while: tuple[str, ...] = (JobState.RUNNING.value,)) -> tuple[float, float | None]:
    """Rows per second from ``started`` to ``end``, and the seconds left at that rate.

    The ETA is 0 once the job succeeded, and None where it cannot be known: no
    rows yet, no total, or a state outside ``eta_while`` (a client's own job
    counts ``queued`` too: parts of it may wait for a worker while others ran).
    """
    rate = done / max(_MIN_ELAPSED_S, end - started) if started and done else 0.0
    if state == JobState.SUCCEEDED.value:
        return rate, 0.0
    if state not in eta_while or rate <= 0 or not total:
        return rate, None
    return rate, max(0.0, (total - done) / rate)

