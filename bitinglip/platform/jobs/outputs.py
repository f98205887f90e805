"""The output directory of a job: its record, its committed partitions and
its manifest.

A partition is committed when its ``part-NNNNN.parquet`` is renamed into
place (its errors table, if any, lands just before, in ``_errors/``).  The
folder reads as the results alone (``pd.read_parquet(out)``,
``dd.read_parquet(out)``): pyarrow skips names starting with ``_`` or ``.``,
and Dask reads only names ending ``.parquet``, so no other file has both a
plain name and that ending (errors tables are Parquet named ``*.errors``;
files being written have a hidden name).  ``_job.json`` is written
when the job is first submitted and pins what the job is (its input
fingerprint and partitioning), so a resumed or resubmitted job runs only the
partitions not yet committed, with the same boundaries, and no row is
written twice.  ``_manifest.json`` is written when the job ends.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitinglip.atomic import TEMP_MARK, temp_path, write_atomically, write_json_atomically
from bitinglip.errors import OutputConflictError, OutputWriteError, RowCountError

RECORD = "_job.json"
MANIFEST = "_manifest.json"
#: the errors tables' folder (see the module's docstring for why the names)
ERRORS_DIR = "_errors"


#: the key, in a result file's Parquet metadata, naming the job that wrote it
JOB_ID_KEY = b"bitinglip.job_id"


@contextmanager
def _writing(path: str, tmp: str | None = None) -> Iterator[None]:
    """Turn a failed write of ``path`` (via ``tmp``) into an
    :class:`OutputWriteError` naming it and the system's reason (a full
    disk, say), and leave no temporary file behind."""
    try:
        yield
    except FileExistsError:  # an answer (see claim), not a failure
        raise
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # the system's words for the errno: pyarrow's own message buries them
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OutputWriteError(f"cannot write {path}: {reason[:1].lower()}{reason[1:]}") from exc


def _dump_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, default=str)


def _write_json(path: str, data: dict[str, Any]) -> None:
    with _writing(path):
        write_json_atomically(path, data, indent=1, default=str)


def write_parquet(frame: Any, path: str, job_id: str) -> None:
    """Write ``frame`` to ``path`` atomically, stamped with ``job_id``: a
    rerun counts a committed file as its own only if the stamp says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _writing(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), JOB_ID_KEY: job_id.encode()})
    with _writing(path):
        write_atomically(path, lambda tmp: pq.write_table(table, tmp))


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as fh:
            return json.load(fh)  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def fingerprint(inputs: Any) -> str:
    """A content hash of the input (for files: path, size and mtime)."""
    from dask.base import tokenize

    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs).expanduser().resolve()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        return tokenize(str(path), [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()])
    return tokenize(inputs)


def _same(key: str, value: Any) -> Any:
    """What must match for a record to be the same job's: a resume pins the
    registry version that ran (``name@version``) where the first run named
    only ``name``."""
    return value.partition("@")[0] if key == "model" and isinstance(value, str) else value


def claim(out_dir: str, record: dict[str, Any]) -> dict[str, Any]:
    """Write the job record, or check that the one there is this job's.

    The record is written whole under a temporary name and hard-linked into
    place, which fails if a record is there already: of two jobs claiming
    one folder at once exactly one wins, and nobody reads half a record.
    Returns the record in force: on a resume, the earlier one (its partition
    size wins, so partitions keep their boundaries)."""
    path = os.path.join(out_dir, RECORD)
    with _writing(path):
        os.makedirs(out_dir, exist_ok=True)
    tmp = temp_path(path)
    try:
        with _writing(path, tmp):
            _dump_json(tmp, record)
            os.link(tmp, path)
        return record
    except FileExistsError:
        pass
    finally:
        Path(tmp).unlink(missing_ok=True)
    previous = read_json(path) or {}
    for key in ("job_id", "fingerprint", "task", "model"):
        if _same(key, previous.get(key)) != _same(key, record.get(key)):
            raise OutputConflictError(
                f"{out_dir} holds the results of another job ({key} differs: {previous.get(key)!r} there, "
                f"{record.get(key)!r} now); use a new output directory, or the same job id and inputs to resume")
    return previous


def partition_file(index: int) -> str:
    return f"part-{index:05d}.parquet"


def errors_file(index: int) -> str:
    """The errors table of partition ``index``, relative to the output folder."""
    return f"{ERRORS_DIR}/part-{index:05d}.errors"


def _check_owner(path: str, job_id: str) -> Any:
    """The Parquet file at ``path``, if ``job_id`` wrote it."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    owner = (file.schema_arrow.metadata or {}).get(JOB_ID_KEY, b"").decode()
    if owner != job_id:
        raise OutputConflictError(f"{path} holds the results of job {owner or '(unknown)'}, not of job {job_id}; "
                                  "use a new output directory")
    return file


def committed_summary(out_dir: str, index: int, job_id: str) -> dict[str, Any] | None:
    """The summary of a partition whose output file is already in place;
    :class:`OutputConflictError` if another job wrote that file (or its
    errors table)."""
    path = os.path.join(out_dir, partition_file(index))
    if not os.path.exists(path):
        return None
    rows = _check_owner(path, job_id).metadata.num_rows
    err_path = os.path.join(out_dir, errors_file(index))
    errors = _check_owner(err_path, job_id).metadata.num_rows if os.path.exists(err_path) else 0
    return {"part": index, "rows": rows, "file": partition_file(index),
            "errors": errors, "errors_file": errors_file(index) if errors else None, "skipped": True}


def column_sum(out_dir: str, count: int, column: str) -> int:
    """The sum of ``column`` over a job's committed partition files (e.g. a
    generate job's ``completion_tokens``), reading that column only."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for i in sorted(committed_parts(out_dir, count)):
        table = pq.read_table(os.path.join(out_dir, partition_file(i)), columns=[column])
        total += int(pc.sum(table.column(column)).as_py() or 0)
    return total


def committed_parts(out_dir: str, count: int) -> set[int]:
    return {i for i in range(count) if os.path.exists(os.path.join(out_dir, partition_file(i)))}


def count_mismatch(rows_in: int, rows_out: int, rows_in_error: int) -> str | None:
    """Why a finished job's figures break "rows in = rows out + rows in
    error", or None when they hold."""
    if rows_out + rows_in_error == rows_in:
        return None
    return (f"rows out ({rows_out}) plus rows in error ({rows_in_error}) make {rows_out + rows_in_error}, "
            f"but the input has {rows_in} rows; the results are not trustworthy")


def write_manifest(summaries: Sequence[dict[str, Any]], out_dir: str, record: dict[str, Any],
                   state: str = "succeeded", error: str | None = None) -> dict[str, Any]:
    """The job's closing record; runs on a worker once every partition is in.

    A job whose counts do not add up gets a failed manifest saying so, and
    this task raises :class:`RowCountError`, so every watcher of the job
    (the client, the scheduler's status plugin) sees it fail."""
    rows_out = sum(int(s["rows"]) for s in summaries)
    rows_in_error = sum(int(s.get("errors", 0)) for s in summaries)
    mismatch = count_mismatch(int(record.get("rows", 0)), rows_out, rows_in_error) if state == "succeeded" else None
    if mismatch is not None:
        state, error = "failed", mismatch
    manifest = {**record, "state": state, "finished": time.time(), "rows_out": rows_out,
                "rows_in_error": rows_in_error, "rows_reused": sum(int(s.get("rows_reused") or 0) for s in summaries),
                "runtime": runtime_summary(summaries),
                "partitions": sorted((_public(s) for s in summaries), key=lambda s: s["part"])}
    if error is not None:
        manifest["error"] = error
    _write_json(os.path.join(out_dir, MANIFEST), manifest)
    for leftover in Path(out_dir).rglob(f"*{TEMP_MARK}*"):  # from attempts that died mid-write
        leftover.unlink(missing_ok=True)
    if mismatch is not None:
        raise RowCountError(f"job {record.get('job_id')}: {mismatch}")
    return manifest


def runtime_summary(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the job ran with, from its partitions' ``runtime``: the engine, the precision and the
    reasons, one value where every partition agrees and the sorted list of values where workers
    chose differently (each partition's own, with the timings behind it, stays in ``partitions``)."""
    seen: dict[str, set[str]] = {}
    for summary in summaries:
        for key, value in (summary.get("runtime") or {}).items():
            if isinstance(value, str | int | float | bool) or value is None:
                seen.setdefault(key, set()).add(value)
    return {k: next(iter(v)) if len(v) == 1 else sorted(v, key=str) for k, v in seen.items()}


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("frame", "errors_frame")}


def write_partial_manifest(out_dir: str, record: dict[str, Any], state: str,
                           error: str | None = None) -> dict[str, Any]:
    """Mark a cancelled or failed job's output as partial, naming what is
    committed (and, for a failed job, why it failed)."""
    summaries = []
    for index in sorted(committed_parts(out_dir, int(record.get("partitions", 0)))):
        try:
            summary = committed_summary(out_dir, index, str(record.get("job_id")))
        except OutputConflictError:  # another job's file: not this job's output
            continue
        if summary is not None:
            summaries.append(summary)
    return write_manifest(summaries, out_dir, record, state, error)
