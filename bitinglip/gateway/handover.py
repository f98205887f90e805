"""Handing a REST job to the cluster: for a submission and for a resume
(same job id, same output, same inputs).  The job's record and inputs are
written beside its output first (:mod:`bitinglip.gateway.rebuild` reads them
back should Redis lose the job), then the cluster runs it to its end whatever
happens to this process.
"""

from __future__ import annotations

from typing import Any

from bitinglip.errors import BitingLipError, OutputWriteError, UnavailableError
from bitinglip.gateway.rebuild import REST_INPUTS, write_rest_record
from bitinglip.platform.jobs import ANNOTATION


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
    with dask.annotate(priority=sub["priority"], **{ANNOTATION: marker}):
        job = platform.submit(sub["task"], model=model, inputs=sub.get("frame", sub["inputs"]), output=output,
                              text_column=sub["text_column"], options=sub["options"], job_id=job_id,
                              input_root=root, tenant=record["owner"])
    platform.detach(job)  # the job survives this process from here on
    return job.total, len(job.futures)


def refusal(exc: BaseException) -> BitingLipError:
    """What a failed hand-over tells the caller."""
    if isinstance(exc, OSError):  # the job's record and inputs are written here, on the gateway's own disk
        return OutputWriteError(f"the gateway cannot write to its results folder ({exc.strerror or exc}); "
                                "it is full or not writable: nothing was submitted")
    return UnavailableError(f"the cluster refused the job: {type(exc).__name__}: {exc}")
