"""A finished job's results: paged JSON rows, or its Parquet files.

Results are read back from the job's output directory (the manifest and one
Parquet file per partition), so any gateway that sees the results directory
can serve them, whichever gateway submitted the job.  A cancelled job
serves the partitions committed so far, marked partial (the header
``X-BitingLip-Partial: true`` and ``"partial": true`` in the body); its
resume (:mod:`bitinglip.gateway.routes.resume`) adds the rest.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from bitinglip.errors import ConflictError, NotFoundError, UnavailableError
from bitinglip.gateway.body import query_int
from bitinglip.gateway.state import Gateway
from bitinglip.platform.jobs import MANIFEST, RECORD, JobState, committed_parts, committed_summary, read_json

MAX_PAGE = 1000
PARTIAL_HEADER = "X-BitingLip-Partial"


def _manifest(output: str) -> dict[str, Any]:
    try:
        with open(os.path.join(output, MANIFEST)) as fh:
            return dict(json.load(fh))
    except (OSError, ValueError) as exc:
        raise UnavailableError(f"this gateway cannot read the job's results ({exc}); "
                               "gateways and workers must share BITINGLIP_RESULTS_DIR") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):  # NaN is not JSON
        return None
    return value


def _committed(output: str) -> dict[str, Any]:
    """A manifest of what a stopped job has committed, read from the files
    themselves: a partition may have committed after the cancel wrote its
    partial manifest."""
    record = read_json(os.path.join(output, RECORD))
    if record is None:
        return {"partitions": []}  # cancelled before any partition was planned
    summaries = (committed_summary(output, i, record["job_id"]) for i in sorted(committed_parts(output, int(record["partitions"]))))
    return {"partitions": [s for s in summaries if s is not None]}


def _partitions(output: str, partial: bool) -> dict[str, Any]:
    return _committed(output) if partial else _manifest(output)


def read_rows(output: str, offset: int, limit: int, partial: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Rows ``offset`` to ``offset + limit`` of the job's output, and the total."""
    import pyarrow.parquet as pq

    manifest = _partitions(output, partial)
    rows: list[dict[str, Any]] = []
    start = 0
    for part in manifest["partitions"]:
        n = int(part["rows"])
        lo, hi = max(offset, start), min(offset + limit, start + n)
        if lo < hi:
            table = pq.read_table(os.path.join(output, part["file"])).slice(lo - start, hi - lo)
            rows += [{k: _jsonable(v) for k, v in row.items()} for row in table.to_pylist()]
        start += n
    return rows, start


async def _readable(request: Request) -> tuple[Gateway, dict[str, Any], bool]:
    """The caller's job, once it has results to read; and whether they are partial."""
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:read")
    job = await gw.own_job(principal, request.path_params["job_id"])
    if job["state"] not in (JobState.SUCCEEDED.value, JobState.CANCELLED.value):
        raise ConflictError(f"job {job['id']} is {job['state']}; results come when it has succeeded "
                            "(or, partial, once it is cancelled)")
    return gw, job, job["state"] == JobState.CANCELLED.value


def _headers(request: Request, partial: bool) -> dict[str, str]:
    return {**getattr(request.state, "ratelimit", {}), PARTIAL_HEADER: "true" if partial else "false"}


async def job_results(request: Request) -> Response:
    gw, job, partial = await _readable(request)
    offset = query_int(request, "offset", 0, 0, 10**12)
    limit = query_int(request, "limit", 100, 1, MAX_PAGE)
    rows, total = await anyio.to_thread.run_sync(read_rows, job["output"], offset, limit, partial)
    nxt = offset + len(rows) if offset + len(rows) < total else None
    return gw.json(request, {"job_id": job["id"], "state": job["state"], "partial": partial, "rows": rows,
                             "offset": offset, "limit": limit, "total": total, "next_offset": nxt},
                   headers={PARTIAL_HEADER: "true" if partial else "false"})


async def result_files(request: Request) -> Response:
    gw, job, partial = await _readable(request)
    manifest = await anyio.to_thread.run_sync(_partitions, job["output"], partial)
    files = [{"name": p["file"], "rows": p["rows"], "url": f"/v1/jobs/{job['id']}/results/files/{p['file']}"}
             for p in manifest["partitions"]]
    return gw.json(request, {"job_id": job["id"], "state": job["state"], "partial": partial, "files": files},
                   headers={PARTIAL_HEADER: "true" if partial else "false"})


async def result_file(request: Request) -> Response:
    _, job, partial = await _readable(request)
    manifest = await anyio.to_thread.run_sync(_partitions, job["output"], partial)
    name = request.path_params["name"]
    if name not in {p["file"] for p in manifest["partitions"]}:  # only the manifest's own names: no traversal
        raise NotFoundError(f"job {job['id']} has no result file {name!r}")
    return FileResponse(os.path.join(job["output"], name), media_type="application/vnd.apache.parquet",
                        filename=name, headers=_headers(request, partial))
