"""A job: partitions running as Dask futures, watched from the client.

``Job`` holds the futures of one submission and answers ``status()``,
``progress()`` (rows done and total, rows/s, ETA; a bar in a terminal or a
notebook), ``cancel()`` and ``result()``.  Progress comes from the workers'
events on the scheduler, so it moves within partitions, not only between.

A choice that costs speed (generation falling back from vLLM to the
transformers engine) is a WARNING on the client's own log as soon as the
first partition has finished, naming the reason: the worker's log is not
where a user in a shell or a notebook looks.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

from bitinglip.errors import (
    BitingLipError,
    InputError,
    JobCancelledError,
    JobFailedError,
    OutputWriteError,
    RowCountError,
)
from bitinglip.platform.jobs.outputs import count_mismatch, runtime_summary, write_partial_manifest
from bitinglip.platform.jobs.spec import JobSpec
from bitinglip.platform.jobs.vocabulary import TERMINAL, JobState, cancel_event_name, rate_and_eta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    rows_done: int
    rows_total: int
    rows_per_s: float
    eta_s: float | None
    state: str
    #: of ``rows_done``, the rows taken from the result store instead of run (see ``submit(reuse=)``)
    rows_reused: int = 0

    def __str__(self) -> str:
        eta = f"{self.eta_s:.0f}s" if self.eta_s is not None else "?"
        reused = f", {self.rows_reused} reused" if self.rows_reused else ""
        return (f"{self.rows_done}/{self.rows_total} rows{reused}, {self.rows_per_s:.1f} rows/s, ETA {eta} "
                f"({self.state})")


class Job:
    """One submitted job. Made by :meth:`Platform.submit`, not directly."""

    def __init__(self, platform: Any, spec: JobSpec, futures: list[Any], part_rows: list[int],
                 final: Any = None, record: dict[str, Any] | None = None,
                 resubmit: tuple[tuple[Any, ...], dict[str, Any]] | None = None) -> None:
        self.platform = platform
        self.spec = spec
        self.id = spec.job_id
        self.futures = futures
        self.part_rows = part_rows
        self.total = sum(part_rows)
        self.final = final  # the manifest future of a job with an output directory
        self.record = record  # what _job.json in the output directory says
        self._resubmit = resubmit
        self.submitted_at = time.time()
        self._first_progress: float | None = None
        self._done_in_part: dict[int, int] = {}
        self._reused_in_part: dict[int, int] = {}
        self._cancelled = False
        self._error: BaseException | None = None
        self._finished_at: float | None = None
        self._counted = False
        self._runtime_said = False
        self._runtime_probe: Any = None  # the future reading a finished partition's runtime

    # --- fed by the platform's subscription to the progress topic
    def _on_progress(self, msg: dict[str, Any]) -> None:
        if self._first_progress is None:
            self._first_progress = time.time()
        self._done_in_part[msg["part"]] = max(self._done_in_part.get(msg["part"], 0), int(msg["done"]))
        self._reused_in_part[msg["part"]] = int(msg.get("reused") or 0)

    @property
    def output(self) -> str | None:
        return self.spec.output

    def _all_futures(self) -> list[Any]:
        return self.futures + ([self.final] if self.final is not None else [])

    def status(self) -> str:
        """queued, running, succeeded, failed or cancelled."""
        if self._cancelled:
            return JobState.CANCELLED.value
        if self._error is not None:
            return JobState.FAILED.value
        futures = self._all_futures()
        if any(f.status == "error" for f in futures):
            return JobState.FAILED.value
        if any(f.status == "cancelled" for f in futures):
            return JobState.CANCELLED.value
        if all(f.status == "finished" for f in futures):
            return JobState.SUCCEEDED.value if self._counts_hold() else JobState.FAILED.value
        if self._done_in_part or any(f.status == "finished" for f in self.futures):
            return JobState.RUNNING.value
        return JobState.QUEUED.value

    def rows_done(self) -> int:
        done = 0
        for i, future in enumerate(self.futures):
            done += self.part_rows[i] if future.status == "finished" else self._done_in_part.get(i, 0)
        return done

    def snapshot(self) -> Progress:
        state = self.status()
        done = self.rows_done()
        start = self._first_progress or self.submitted_at
        end = self._finished_at if self._finished_at and state != JobState.RUNNING.value else time.time()
        rate, eta = rate_and_eta(done, self.total, start, end, state,
                                 eta_while=(JobState.QUEUED.value, JobState.RUNNING.value))
        return Progress(done, self.total, rate, eta, state, sum(self._reused_in_part.values()))

    def done(self) -> bool:
        return self.status() in TERMINAL

    def progress(self, wait: bool = True, interval: float = 0.25) -> Progress:
        """With ``wait`` (the default), show a progress bar until the job
        ends; without, return the current figures at once.  The bar shows
        these figures' rows/s, so what it ends on is what this returns."""
        if not wait:
            return self.snapshot()
        if _notebook_without_widgets():
            # tqdm's text bar in a notebook prints a line per update (about 40 for a 4-row job): one line instead
            while not self.done():
                self._say_runtime()
                time.sleep(interval)
            self._say_runtime(block=True)
            final = self._final()
            print(f"{self.spec.task.name} {self.id[:8]}: {final}", flush=True)
            return final
        from tqdm.auto import tqdm

        with tqdm(total=self.total, unit="row", desc=f"{self.spec.task.name} {self.id[:8]}", dynamic_ncols=True,
                  bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]") as bar:
            while not self.done():
                self._show(bar, self.snapshot())
                self._say_runtime()
                time.sleep(interval)
            self._say_runtime(block=True)
            final = self._final()
            self._show(bar, final)
        return final

    @staticmethod
    def _show(bar: Any, snap: Progress) -> None:
        eta = f", ETA {snap.eta_s:.0f}s" if snap.eta_s else ""
        bar.set_postfix_str(f"{snap.rows_per_s:.1f} rows/s{eta}", refresh=False)
        bar.update(snap.rows_done - bar.n)  # refreshes with the postfix

    def _final(self) -> Progress:
        """The figures at the job's end, fixed from then on."""
        self._finished_at = self._finished_at or time.time()
        return self.snapshot()

    def cancel(self) -> None:
        """Stop the job: queued partitions never start, running ones stop at
        their next micro-batch."""
        from distributed import Event

        self._cancelled = True
        Event(cancel_event_name(self.id), client=self.platform.client).set()
        self.platform.client.cancel(self._all_futures())
        if self.output is not None and self.record is not None:
            write_partial_manifest(self.output, self.record, JobState.CANCELLED.value)

    def resume(self) -> Job:
        """Run the partitions of this job that are not committed yet.

        Needs an output directory: committed partitions are skipped there, so
        no row is computed or written twice."""
        if self.output is None or self._resubmit is None:
            raise InputError("only a job with an output directory can be resumed")
        args, kwargs = self._resubmit
        return self.platform.submit(*args, **kwargs)  # type: ignore[no-any-return]

    def wait(self, timeout: float | None = None) -> None:
        """Block until every partition has ended; raise if one failed."""
        from distributed import as_completed
        from distributed import wait as dask_wait

        if self._cancelled:
            raise JobCancelledError(f"job {self.id} was cancelled")
        index = {f.key: i for i, f in enumerate(self.futures)}
        for future in as_completed(self.futures, timeout=timeout):
            if future.status == "error":
                self._fail(future, f"partition {index[future.key]}")
            if future.status == "cancelled":
                raise JobCancelledError(f"job {self.id} was cancelled")
            self._say_runtime()
        self._say_runtime(block=True)
        if self.final is not None:
            dask_wait([self.final], timeout=timeout)
        if self.final is not None and self.final.status == "error":
            self._fail(self.final, "the manifest")
        if not self._counts_hold():
            assert self._error is not None
            raise self._error
        self._finished_at = self._finished_at or time.time()

    def _say_runtime(self, block: bool = False) -> None:
        """Once per job, when a partition has finished: a WARNING where its runtime says the
        engine fell back (the reason comes from the worker, see ``pick_engine``).  The runtime is
        read by a small task that never holds up the caller's loop unless ``block`` (the job's end)."""
        if self._runtime_said:
            return
        client = self.platform.client
        if self._runtime_probe is None:
            finished = next((f for f in self.futures if f.status == "finished"), None)
            if finished is None:
                return
            # ahead of the job's queued partitions: it reads a dict where the partition's result lies
            self._runtime_probe = client.submit(_runtime_of, finished, pure=False, priority=100)
        if not block and not self._runtime_probe.done():
            return
        self._runtime_said = True
        try:
            runtime = self._runtime_probe.result(timeout=30)["runtime"]
        except Exception:  # noqa: BLE001 - the summary went with its worker: the manifest still says it
            return
        if runtime.get("engine_fallback"):
            log.warning("job %s runs %s on the %s engine, not vLLM (several times slower): %s", self.id[:8],
                        self.spec.task.name, runtime.get("engine"), runtime.get("engine_reason"))

    def _counts_hold(self) -> bool:
        """Whether rows in = rows out + rows in error, once every partition
        is in.  A job with an output directory checks this in its manifest
        task; an in-memory job checks it here, once, counting each
        partition's frames where they lie."""
        if self.final is not None or self._counted:
            return self._error is None
        client = self.platform.client
        figures = client.gather(client.map(_rows_and_errors, self.futures, pure=False))
        self._counted = True
        mismatch = count_mismatch(self.total, sum(r for r, _ in figures), sum(e for _, e in figures))
        if mismatch is not None and self._error is None:
            self._error = RowCountError(f"job {self.id}: {mismatch}")
        return self._error is None

    def _fail(self, future: Any, where: str) -> None:
        exc = future.exception()
        self._error = exc
        # the rest of the job is moot: free the workers for other jobs
        self.platform.client.cancel([f for f in self._all_futures() if f.status != "error"])
        if self.output is not None and self.record is not None:
            try:
                write_partial_manifest(self.output, self.record, JobState.FAILED.value,
                                       f"{where}: {type(exc).__name__}: {exc}")
            except OutputWriteError:  # the disk that failed the job: its own error says more
                pass
        if isinstance(exc, BitingLipError):
            raise exc
        raise JobFailedError(f"job {self.id} failed in {where}: {type(exc).__name__}: {exc}") from exc

    def summaries(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Per-partition figures (rows, errors, batches, tokens, attempts...)."""
        self.wait(timeout)
        if self.final is not None:
            return list(self.final.result()["partitions"])
        return [{k: v for k, v in s.items() if k not in ("frame", "errors_frame")}
                for s in self.platform.client.gather(self.futures)]

    def rows_reused(self, timeout: float | None = None) -> int:
        """Rows the job took from the result store instead of running them (once it has ended;
        ``progress()`` counts them as they come)."""
        return sum(int(s.get("rows_reused") or 0) for s in self.summaries(timeout))

    def _frames(self, which: str, timeout: float | None) -> list[pd.DataFrame]:
        self.wait(timeout)
        if self.output is None:
            key = "frame" if which == "rows" else "errors_frame"
            return [s[key] for s in self.platform.client.gather(self.futures)]
        name = "file" if which == "rows" else "errors_file"
        return [pd.read_parquet(os.path.join(self.output, s[name]))
                for s in self.final.result()["partitions"] if s.get(name)]

    def result(self, timeout: float | None = None) -> pd.DataFrame:
        """The outputs as one DataFrame, one row per input, in input order
        (rows that failed are in :meth:`errors` instead).

        For a job with an output directory this reads its Parquet files back;
        for jobs bigger than memory read ``job.output`` piece by piece instead.
        """
        frames = [f for f in self._frames("rows", timeout) if len(f)]
        if not frames:
            frame = pd.DataFrame({c: [] for c in ("id", *self.spec.task.columns, "truncated")})
        else:
            frame = pd.concat(frames, ignore_index=True)
        frame.attrs["runtime"] = self.runtime()
        return frame

    def runtime(self, timeout: float | None = None) -> dict[str, Any]:
        """What the job ran with: the engine (``vllm`` or ``transformers``) and why,
        the matmul precision that ``auto`` chose on the workers (also in the output
        folder's ``_manifest.json`` and in ``job.result().attrs["runtime"]``)."""
        self.wait(timeout)
        if self.final is not None:
            return dict(self.final.result().get("runtime") or {})
        client = self.platform.client
        return runtime_summary(client.gather(client.map(_runtime_of, self.futures, pure=False)))

    def errors(self, timeout: float | None = None) -> pd.DataFrame:
        """The rows that failed: their ``id`` and the ``reason``."""
        frames = [f for f in self._frames("errors", timeout) if len(f)]
        if not frames:
            return pd.DataFrame({"id": [], "reason": []})
        return pd.concat(frames, ignore_index=True)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.spec.task.name} {self.spec.model!r}: {self.snapshot()}>"


def _notebook_without_widgets() -> bool:
    """A Jupyter kernel where tqdm's widget bar cannot load (no ipywidgets)."""
    import sys

    if "IPython" not in sys.modules:
        return False  # not in IPython: a terminal or a script
    from IPython import get_ipython

    if not hasattr(get_ipython(), "kernel"):
        return False  # the IPython terminal: tqdm's text bar works there
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return True
    return False


def _runtime_of(summary: dict[str, Any]) -> dict[str, Any]:
    """On the worker holding a partition's result: what it ran with."""
    return {"runtime": summary.get("runtime") or {}}


def _rows_and_errors(summary: dict[str, Any]) -> tuple[int, int]:
    """On the worker holding a partition's result: its two counts."""
    return len(summary["frame"]), len(summary["errors_frame"])


def progress_dict(progress: Progress) -> dict[str, Any]:
    return asdict(progress)
