"""Handing a REST job to the cluster: for a submission and for a resume
(same job id, same output, same inputs).  The job's record and inputs are
written beside its output first (:mod:`bitinglip.gateway.rebuild` reads them
back should Redis lose the job), then the cluster runs it to its end whatever
happens to this process.  :func:`submit` is the one sequence a REST job
and an OpenAI batch go through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio

from bitinglip.errors import BitingLipError, OutputWriteError, UnavailableError
from bitinglip.gateway.rebuild import REST_INPUTS, write_rest_record
from bitinglip.platform.jobs import ANNOTATION, MISSING, JobStore


async def submit(gw: Any, job_id: str, sub: dict[str, Any], model: str, output: str, record: dict[str, Any],
                 extra: Mapping[str, Any] | None = None,
                 undo: Callable[[], Awaitable[Any]] | None = None) -> dict[str, Any]:
    """Hand a job whose record is in Redis to the cluster (:func:`hand_over`,
    on a worker thread), then write what the hand-over counted (``rows_total``,
    ``parts``, and ``extra``) into its record (:func:`record_figures`); those
    figures are returned.  Should the cluster refuse it, ``undo`` runs first
    (e.g. forget the record) and the caller gets a :class:`BitingLipError`."""
    try:
        total, parts = await anyio.to_thread.run_sync(hand_over, gw.platform, job_id, sub, model, output, record,
                                                      limiter=gw.submissions)
    except BaseException as exc:
        if undo is not None:
            await undo()
        if isinstance(exc, BitingLipError | asyncio.CancelledError):
            raise
        raise refusal(exc) from exc
    figures = {"rows_total": total, "parts": parts, **(extra or {})}
    await record_figures(gw.store, job_id, record, figures)
    return figures


async def record_figures(store: JobStore, job_id: str, record: Mapping[str, Any], figures: Mapping[str, Any]) -> None:
    """Write ``figures`` into the job's record.  Where Redis lost it meanwhile,
    the record goes back first, then the figures again: a restore writes
    only where there is no record, and the status plugin may have written
    one since (the job started), which would otherwise never get them."""
    if await store.transition(job_id, None, figures) == MISSING:
        await store.restore({**record, **figures})
        await store.transition(job_id, None, figures)


def hand_over(platform: Any, job_id: str, sub: dict[str, Any], model: str, output: str,
              record: dict[str, Any]) -> tuple[int, int]:
    """On a worker thread: hand the job to the cluster and let go of it
    (also to resume it: same job id, same output, same inputs).  An input
    path must lie in ``sub["input_root"]`` when given (an OpenAI batch's
    input lies beside its output), else in ``BITINGLIP_INPUT_DIR``."""
    import dask

    root = sub.get("input_root") or platform.settings.input_dir
    write_rest_record(output, {"inputs": sub["inputs"], "text_column": sub["text_column"],
                               "input_root": sub.get("input_root")}, REST_INPUTS)
    write_rest_record(output, record)
    # only the id (and, for a resume, the gateway's own clock): the scheduler serialises
    # annotations with msgpack, and a caller's value it cannot encode (an int of 2**64)
    # would drop every worker
    marker: dict[str, Any] = {"id": job_id}
    if record.get("resumed_at"):
        marker["resumed_at"] = float(record["resumed_at"])  # the status plugin follows the job again
    with dask.annotate(**{ANNOTATION: marker}):
        job = platform.submit(sub["task"], model=model, inputs=sub.get("frame", sub["inputs"]), output=output,
                              text_column=sub["text_column"], options=sub["options"], job_id=job_id,
                              input_root=root, tenant=record["owner"], priority=sub["priority"])
    platform.detach(job)  # the job survives this process from here on
    return job.total, len(job.futures)


def refusal(exc: BaseException) -> BitingLipError:
    """What a failed hand-over tells the caller."""
    if isinstance(exc, OSError):  # the job's record and inputs are written here, on the gateway's own disk
        return OutputWriteError(f"the gateway cannot write to its results folder ({exc.strerror or exc}); "
                                "it is full or not writable: nothing was submitted")
    return UnavailableError(f"the cluster refused the job: {type(exc).__name__}: {exc}")
