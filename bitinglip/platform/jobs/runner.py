"""What runs on a worker for one partition of a job.

``run_partition`` takes the partition's rows, reaches the model through the
worker plugin, tokenizes, cuts micro-batches by token budget, predicts,
restores input order, and returns a DataFrame (or writes it to Parquet
atomically and returns a summary).  Progress goes to the scheduler as Dask
events on one topic, and each partition's start and summary on another; a
cancelled job is noticed between micro-batches.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import pandas as pd

from bitinglip.errors import InputError, JobCancelledError, JobTimeoutError, ModelError, PartitionFailedError
from bitinglip.platform.cluster.dask_internals import secede_once, task_released
from bitinglip.platform.jobs.inputs import require_column
from bitinglip.platform.jobs.outputs import committed_summary, errors_file, partition_file, write_parquet
from bitinglip.platform.jobs.reuse import (
    ResultStore,
    reusable_rows,
    row_key,
    space_of,
    stable_runtime,
    store_frame,
    store_root,
)
from bitinglip.platform.jobs.spec import JobSpec
from bitinglip.platform.jobs.vocabulary import PROGRESS_TOPIC, SUMMARY_TOPIC, cancel_event_name, task_key
from bitinglip.platform.plugins.budgets import ReducedBudgets
from bitinglip.platform.tasks.batching import budget_of, padding_ratio, plan_batches
from bitinglip.platform.tasks.builtin import Batch, TaskType, get_task, texts_or_error
from bitinglip.platform.tasks.engines.base import ONLINE

#: a partition's start (the job's task and model) and its summary when done go out on vocabulary.SUMMARY_TOPIC;
#: these are the summary's figures that go to the scheduler (the frames stay on the worker)
SUMMARY_FIELDS = ("rows", "errors", "tokens", "batches", "oom_splits", "padding_ratio", "seconds", "truncated",
                  "rows_reused")
PROGRESS_INTERVAL_S = 0.5
#: a cancel reaches a generation engine within about this long (plus the engine's tick)
CANCEL_CHECK_INTERVAL_S = 0.5
#: partitions of engine-driven tasks (generation) that may wait on a worker's engines at once: each leaves the
#: worker's thread pool while its engine works, so the next partition starts and joins the same continuous
#: batch; more than this many would only hold their rows in memory, so the next one waits for a slot.  Not a
#: setting: what a deployment tunes is the engine's batch (BITINGLIP_KV_CACHE_BYTES), which this only has to feed
ENGINE_PARTITIONS = 8
_engine_slots = threading.BoundedSemaphore(ENGINE_PARTITIONS)
log = logging.getLogger(__name__)


class _Reporter:
    """Sends progress events and checks for cancellation, both throttled."""

    def __init__(self, spec: JobSpec, index: int, total: int) -> None:
        self.spec, self.index, self.total = spec, index, total
        self.worker = _current_worker()
        self.last_sent = self.last_check = time.monotonic()
        #: rows taken from the result store: done before the model saw a row
        self.reused = 0

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        done = min(self.total, done + self.reused)
        if self.worker is not None and (final or now - self.last_sent >= PROGRESS_INTERVAL_S):
            self.last_sent = now
            self.worker.log_event(PROGRESS_TOPIC, {"job": self.spec.job_id, "part": self.index,
                                                   "done": done, "total": self.total, "reused": self.reused})
        if not final and self.spec.deadline is not None and time.time() > self.spec.deadline:
            raise JobTimeoutError(f"job {self.spec.job_id} ran past its timeout (partition {self.index} "
                                  f"stopped after {done} of {self.total} rows)")
        if self.worker is not None and not final and now - self.last_check >= CANCEL_CHECK_INTERVAL_S:
            self.last_check = now
            from distributed import Event

            if Event(cancel_event_name(self.spec.job_id)).is_set():
                raise JobCancelledError(f"job {self.spec.job_id} was cancelled (partition {self.index} "
                                        f"stopped after {done} of {self.total} rows)")


def _current_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except ValueError:
        return None


def _on_engine(run_rows: Any, *args: Any, online: bool = False) -> Any:
    """``run_rows(*args)`` with the worker's thread given back while the engine works.

    A Dask worker runs as many tasks at once as it has threads (one, on the
    embedded cluster); a partition that only waits on its engine would keep
    every other partition, of this job or another, from feeding the same
    continuous batch.  So it secedes from the thread pool (``distributed.secede``,
    as ``worker_client`` does) and the worker starts its next task; at most
    :data:`ENGINE_PARTITIONS` wait at once, a further one holds its thread
    until a slot frees.  The task stays running for Dask (state
    ``long-running``), so the model stays held and a worker death reruns it.

    ``online``: a gateway's request takes no slot: it would wait, holding its
    thread, behind up to :data:`ENGINE_PARTITIONS` bulk partitions (the engine
    interleaves it with them instead), and its rows skip the engine's prefix sweep."""
    if online:
        secede_once()
        token = ONLINE.set(True)
        try:
            return run_rows(*args)
        finally:
            ONLINE.reset(token)
    with _engine_slots:
        secede_once()  # once per task: a retry of the partition is the same task
        return run_rows(*args)


def abandon_tick() -> Any:
    """An engine ``tick`` for an online task: it raises
    :class:`JobCancelledError` once the task's caller let go of it (the
    gateway cancels its future when the client disconnects or its wait
    times out), so the engine aborts the requests nobody will read.  Dask
    cannot stop the task's thread; without this the engine went on
    generating for minutes after the caller left.  Checked at most every
    :data:`CANCEL_CHECK_INTERVAL_S`; outside a worker it never raises."""
    worker = _current_worker()
    key = worker.get_current_task() if worker is not None else None
    last = time.monotonic()

    def tick(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if worker is None or now - last < CANCEL_CHECK_INTERVAL_S:
            return
        last = now
        if task_released(worker, key):
            raise JobCancelledError(f"online task {key} was let go by its caller ({done} of its requests done)")

    return tick


def _tick(reporter: _Reporter, before: int, done: int) -> None:
    reporter.update(before + done)


def _rows(data: Any, spec: JobSpec, offset: int) -> tuple[list[Any], list[Any], dict[str, list[Any]]]:
    """Ids, texts, and the task's other input columns (``TaskType.input_columns``) that the data has."""
    if isinstance(data, pd.DataFrame):
        task = spec.task
        if not any(c in data.columns for c in task.text_alternatives):
            require_column(data.columns, spec.text_column)
        ids = data["id"].tolist() if "id" in data.columns else list(range(offset, offset + len(data)))
        texts = data[spec.text_column].tolist() if spec.text_column in data.columns else [None] * len(data)
        return ids, texts, {c: data[c].tolist() for c in task.input_columns if c in data.columns}
    values = list(data)
    return list(range(offset, offset + len(values))), values, {}


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def _free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def predict_rows(task: TaskType, loaded: Any, texts: list[str], options: Mapping[str, Any], budget: int,
                 reporter: _Reporter | None = None, fail_fast: bool = False, model_key: str = "",
                 faults: Mapping[str, Any] | None = None, budgets: ReducedBudgets | None = None,
                 ) -> tuple[list[dict[str, Any] | None], list[bool], dict[int, str], dict[str, float]]:
    """Outputs for ``texts`` in their order, truncation flags, the rows that
    failed (index -> reason) and stats.

    A batch that runs out of memory is split in half and retried, and the
    smaller budget is remembered for ``model_key`` in ``budgets`` (the
    worker's, from its model plugin); a batch that fails otherwise
    is retried row by row so that only the bad rows fail (unless
    ``fail_fast``).
    """
    if budgets is not None and model_key:
        budget = budgets.cap(model_key, budget)
    ids, truncated = task.tokenize(loaded, texts, options)
    costs = [task.batch_cost(len(row), options) for row in ids]
    batches = plan_batches(costs, budget)
    failed = _tokenless(ids, fail_fast)
    queue = deque(r for r in ([i for i in b if i not in failed] for b in batches) if r)
    outputs: list[dict[str, Any] | None] = [None] * len(texts)
    oom_limit = int((faults or {}).get("oom_above_tokens", 0))
    heap = _HeapGuard()
    done, oom_splits = len(failed), 0
    while queue:
        rows = queue.popleft()
        size = len(rows) * max(costs[i] for i in rows)
        try:
            if oom_limit and size > oom_limit:
                raise MemoryError(f"injected out-of-memory: {size} tokens > {oom_limit}")
            results = _predict_batch(task, loaded, texts, ids, rows, options)
        except (JobCancelledError, JobTimeoutError):
            raise
        except Exception as exc:  # every failure is either split, isolated or reported
            if fail_fast and not (len(rows) > 1 and _is_out_of_memory(exc)):
                raise
            retry = _retry_plan(exc, rows)
            if retry is None:
                failed[rows[0]] = f"{type(exc).__name__}: {exc}"
                results = []
            else:
                if _is_out_of_memory(exc):
                    oom_splits += 1
                    if budgets is not None and model_key:
                        budgets.reduce(model_key, budget, size)
                queue.extendleft(reversed(retry))
                continue
        for i, result in zip(rows, results):
            outputs[i] = result
        done += len(rows)
        heap.check()
        if reporter is not None:
            reporter.update(done)
    stats = {"batches": len(batches), "tokens": sum(len(r) for r in ids), "oom_splits": oom_splits,
             "padding_ratio": padding_ratio(costs, batches)}
    return outputs, truncated, failed, stats


def _predict_batch(task: TaskType, loaded: Any, texts: list[str], ids: list[list[int]], rows: list[int],
                   options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The task's outputs for ``rows`` (positions in ``texts``), one per row."""
    results = task.predict(loaded, Batch([texts[i] for i in rows], [ids[i] for i in rows]), options)
    if len(results) != len(rows):
        raise RuntimeError(f"task {task.name!r} returned {len(results)} outputs for {len(rows)} inputs")
    return results


def predict_texts(task_name: str, model: str, options: Mapping[str, Any], texts: list[str]) -> list[dict[str, Any]]:
    """Runs on a worker for the gateway's ``/v1/infer``: one output dict per
    text, in order, JSON-ready.  The first bad text fails the call (the
    gateway checked them all before; a batch that fails anyway is rerun
    request by request)."""
    from bitinglip.platform.plugins.model_plugin import get_model_plugin

    task = get_task(task_name)
    merged = task.check_options(options)
    texts_or_error(texts, [f"inputs[{i}]" for i in range(len(texts))])
    # held for this call only: a worker cannot tell which task runs in a thread
    with get_model_plugin().use(task, model, merged) as loaded:
        if task.engine_driven:  # its engine batches these with whatever else runs on this worker
            rows = [task.check_row(t, {}, f"inputs[{i}]", merged) for i, t in enumerate(texts)]
            results, cut, failed, _ = _on_engine(task.run_rows, loaded, rows, merged, abandon_tick(), online=True)
            if failed:
                first = min(failed)
                raise InputError(f"inputs[{first}]: {failed[first]}")
            return [{**{k: _plain(v) for k, v in (out or {}).items()}, "truncated": c} for out, c in zip(results, cut)]
        ids, truncated = task.tokenize(loaded, texts, merged)
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:  # e.g. "" for a tokenizer that adds no special tokens: nothing to run the model on
            raise InputError(f"inputs[{empty[0]}] has no tokens for model {model!r}")
        outputs: list[dict[str, Any]] = [{}] * len(texts)
        costs = [task.batch_cost(len(row), merged) for row in ids]
        for rows in plan_batches(costs, budget_of(loaded, 0)[0]):
            for i, result in zip(rows, _predict_batch(task, loaded, texts, ids, rows, merged)):
                outputs[i] = result
    return [{**{k: _plain(v) for k, v in out.items()}, "truncated": cut} for out, cut in zip(outputs, truncated)]


def _plain(value: Any) -> Any:
    """``value`` as JSON can take it (arrays and tensors become lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tokenless(ids: list[list[int]], fail_fast: bool) -> dict[int, str]:
    """Rows with nothing to run a model on (a tokenizer without special
    tokens, an empty text), each with its reason."""
    empty = [i for i, row in enumerate(ids) if not row]
    if empty and fail_fast:
        raise InputError(f"row {empty[0]} of the partition has no tokens for this model")
    return dict.fromkeys(empty, "the text has no tokens for this model")


def _retry_plan(exc: Exception, rows: list[int]) -> list[list[int]] | None:
    """The batches to try instead of ``rows`` after ``exc``, in order; None
    when ``rows`` is one row that failed for good.  Out of memory: two
    halves.  Otherwise each row alone, so that only the bad ones fail."""
    if len(rows) > 1 and _is_out_of_memory(exc):
        _free_device_memory()
        half = len(rows) // 2
        return [rows[:half], rows[half:]]
    if len(rows) > 1:
        return [[i] for i in rows]
    return None


def _check_rows(spec: JobSpec, ids: list[Any], values: list[Any], extra: Mapping[str, list[Any]]
                ) -> tuple[list[int], list[Any], dict[int, str]]:
    """Positions of good rows, those rows as the task takes them, and the bad ones with their reasons."""
    good, rows, bad = [], [], {}
    for pos, (row_id, value) in enumerate(zip(ids, values)):
        try:
            rows.append(spec.task.check_row(value, {c: v[pos] for c, v in extra.items()}, row_id, spec.options))
            good.append(pos)
        except InputError as exc:
            if spec.fail_fast:
                raise
            bad[pos] = str(exc)
    return good, rows, bad


def _lookup(spec: JobSpec, plugin: Any, loaded: Any, runtime: Mapping[str, Any], texts: list[Any]
            ) -> tuple[ResultStore | None, list[str | None], dict[int, dict[str, Any]]]:
    """The partition's store, each row's key (None: not reusable) and the stored results by
    row position.  The key holds what the loaded model runs with (engine, precision, its
    token limit), so a result is reused only where a fresh run would give the same one.  The
    store's folder and cap are the worker's (its plugin's settings), not the job's: the store
    lies on the worker's disk beside its models and serves every job there."""
    if spec.reuse is None or not texts or plugin.settings.reuse_max_bytes == 0:
        return None, [None] * len(texts), {}
    settings = plugin.settings
    try:
        space = space_of(spec.task.name, plugin.identity(spec.model), spec.options,
                         {**stable_runtime(runtime), "max_length": getattr(loaded, "max_length", None)})
        store = ResultStore(store_root(settings), spec.reuse.tenant, space, settings.reuse_max_bytes)
        keys = [row_key(space, row) if ok else None
                for row, ok in zip(texts, reusable_rows(spec.task.name, spec.options, texts))]
        found = store.lookup([k for k in keys if k is not None])
    except OSError as exc:  # the store is an optimisation: without it every row runs
        log.warning("result store unavailable for job %s (%s); running every row", spec.job_id, exc)
        return None, [None] * len(texts), {}
    hits = {i: dict(found[k]) for i, k in enumerate(keys) if k is not None and k in found}
    return store, keys, hits


def _merge(count: int, hits: Mapping[int, dict[str, Any]], misses: list[int],
           run: tuple[list[dict[str, Any] | None], list[bool], dict[int, str], dict[str, float]]
           ) -> tuple[list[dict[str, Any] | None], list[bool], dict[int, str], dict[str, float]]:
    """Stored and fresh results together, in the partition's row order."""
    fresh, cut, failed, stats = run
    outputs: list[dict[str, Any] | None] = [None] * count
    truncated = [False] * count
    for i, row in hits.items():
        truncated[i] = bool(row.pop("truncated", False))
        outputs[i] = row
    for j, i in enumerate(misses):
        outputs[i], truncated[i] = fresh[j], cut[j]
    return outputs, truncated, {misses[j]: why for j, why in failed.items()}, stats


def _keep(store: ResultStore | None, keys: list[str | None], misses: list[int], failed: Mapping[int, str],
          outputs: list[dict[str, Any] | None], truncated: list[bool], columns: tuple[str, ...]) -> None:
    """Store the rows this partition computed (a failed row is never stored)."""
    new = [i for i in misses if i not in failed and keys[i] is not None and outputs[i] is not None]
    if store is None or not new:
        return
    try:
        store.save(store_frame([keys[i] for i in new], [outputs[i] or {} for i in new],
                               [truncated[i] for i in new], columns))
    except OSError as exc:  # a full or read-only disk loses the reuse, not the job
        log.warning("result store: keeping %d rows failed (%s)", len(new), exc)


def _frame(spec: JobSpec, ids: list[Any], outputs: list[dict[str, Any]], truncated: list[bool]) -> pd.DataFrame:
    columns: dict[str, list[Any]] = {"id": ids}
    names = list(spec.task.columns) + sorted({k for o in outputs for k in o} - set(spec.task.columns))
    for name in names:
        columns[name] = [o.get(name) for o in outputs]
    columns["truncated"] = truncated
    return pd.DataFrame(columns)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None


def trim_heap() -> None:
    """Give the worker's freed heap back to the system (glibc's
    ``malloc_trim``).  Workers keep freed memory while a partition runs, so
    activation tensors reuse pages instead of faulting fresh ones (see
    ``cluster.PRE_SPAWN_ENV``); between partitions it goes back, so a
    worker's memory stays flat however many partitions it runs."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: freed heap a worker may hold on to within a partition before it is trimmed
HEAP_SLACK_BYTES = 256 * 1024 * 1024


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0


class _HeapGuard:
    """Trims the heap when it grows :data:`HEAP_SLACK_BYTES` past where it
    was: freed tensors leave holes that glibc never hands back by itself,
    and without this a worker's peak memory creeps up with every partition."""

    def __init__(self) -> None:
        self.limit = _rss() + HEAP_SLACK_BYTES

    def check(self) -> None:
        if self.limit > HEAP_SLACK_BYTES and _rss() > self.limit:
            trim_heap()
            self.limit = max(self.limit, _rss() + HEAP_SLACK_BYTES)  # live memory did grow: do not trim each batch


def _worker_address() -> str | None:
    """The Dask worker running this task (None outside a worker)."""
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:
        return None


def run_partition(data: Any, spec: JobSpec, index: int, offset: int) -> dict[str, Any]:
    """Run one partition on this worker and return its summary (see :func:`_run_partition`).

    The scheduler hears of the partition on :data:`SUMMARY_TOPIC` when it
    starts and when it is done; the partition tells it itself, since a
    worker plugin could only find the job in the task's private run spec."""
    worker = _current_worker()
    _announce(worker, spec, {"phase": "start"})
    try:
        summary = _run_partition(data, spec, index, offset)
    finally:
        trim_heap()
    _announce(worker, spec, summary_event(summary))
    return summary


def summary_event(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a partition's summary that goes to the scheduler."""
    event: dict[str, Any] = {"part": int(summary.get("part", 0)), "phase": "done",
                             "skipped": bool(summary.get("skipped", False))}
    event.update({name: float(summary[name]) for name in SUMMARY_FIELDS if summary.get(name) is not None})
    return event


def _announce(worker: Any, spec: JobSpec, event: dict[str, Any]) -> None:
    if worker is not None:
        worker.log_event(SUMMARY_TOPIC, {"job": spec.job_id, "task": spec.task.name, "model": spec.model, **event})


def _run_partition(data: Any, spec: JobSpec, index: int, offset: int) -> dict[str, Any]:
    """Run one partition on this worker and return its summary.

    Without an output directory the summary carries the DataFrames
    (``frame``, ``errors``); with one, they are written atomically (errors
    first, then the part file whose rename commits the partition), and a
    partition already committed is not run again.
    """
    from bitinglip.platform.plugins.model_plugin import get_model_plugin

    if spec.output is not None:
        committed = committed_summary(spec.output, index, spec.job_id)
        if committed is not None:  # a rerun after a worker died past its commit
            return committed
    started = time.perf_counter()
    ids, values, extra = _rows(data, spec, offset)
    reporter = _Reporter(spec, index, len(values))
    good, texts, bad = _check_rows(spec, ids, values, extra)
    attempts: list[str] = []
    stats: dict[str, float] = {"batches": 0, "tokens": 0, "oom_splits": 0, "padding_ratio": 1.0}
    outputs: list[dict[str, Any] | None] = []
    truncated: list[bool] = []
    failed: dict[int, str] = {}
    runtime: dict[str, Any] = {}  # the automatic choices the loaded model runs with (engine, precision)
    while texts:
        try:
            reporter.update(0)
            plugin = get_model_plugin()
            loaded = plugin.get(spec.task, spec.model, spec.options, holder=task_key(spec.job_id, index))
            runtime = dict(getattr(loaded, "info", {}).get("runtime") or {})
            budget, chosen = budget_of(loaded, spec.worker.token_budget)
            if not spec.task.engine_driven:
                runtime.update(chosen)  # the budget is an int: results reuse does not key on it
            store, keys, hits = _lookup(spec, plugin, loaded, runtime, texts)
            reporter.reused = len(hits)
            misses = [i for i in range(len(texts)) if i not in hits]
            if not misses:  # every row was in the store: the model runs nothing
                run = ([], [], {}, {"batches": 0, "tokens": 0, "oom_splits": 0, "padding_ratio": 1.0})
            elif spec.task.engine_driven:  # the whole partition to the worker's engine, batched with the others
                run = _on_engine(spec.task.run_rows, loaded, [texts[i] for i in misses], spec.options,
                                 functools.partial(_tick, reporter, len(bad)))
            else:
                run = predict_rows(spec.task, loaded, [texts[i] for i in misses], spec.options, budget, reporter,
                                   spec.fail_fast, f"{spec.task.name}:{spec.model}:{loaded.device}",
                                   spec.worker.faults, plugin.budgets)
            outputs, truncated, failed, stats = _merge(len(texts), hits, misses, run)
            if failed and spec.fail_fast:
                first = min(failed)
                raise InputError(f"row id={ids[good[first]]!r}: {failed[first]}")
            _keep(store, keys, misses, failed, outputs, truncated, spec.task.columns)
            break
        except (JobCancelledError, JobTimeoutError, InputError, ModelError):  # retrying cannot change these
            raise
        except Exception as exc:
            attempts.append(f"{type(exc).__name__}: {exc}")
            if len(attempts) > spec.retries:
                # the same failure each time (a model that will not load) is said once
                said = attempts[0] if len(set(attempts)) == 1 else " | ".join(attempts)
                raise PartitionFailedError(f"partition {index} failed after {len(attempts)} attempt(s): "
                                           + said) from exc
    for pos, reason in failed.items():
        bad[good[pos]] = f"row id={ids[good[pos]]!r}: {reason}"
    kept = [k for k, p in enumerate(good) if k not in failed]
    frame = _frame(spec, [ids[good[k]] for k in kept], [outputs[k] or {} for k in kept],
                   [truncated[k] for k in kept])
    errors = pd.DataFrame({"id": [ids[p] for p in sorted(bad)], "reason": [bad[p] for p in sorted(bad)]})
    reporter.update(len(values) - reporter.reused, final=True)
    summary: dict[str, Any] = {"part": index, "rows": len(frame), "errors": len(errors), "rows_reused": reporter.reused,
                               "truncated": int(frame["truncated"].sum()), "attempts": attempts,
                               "seconds": time.perf_counter() - started, "worker": _worker_address(),
                               "runtime": runtime, **stats}
    if spec.output is None:
        return {**summary, "frame": frame, "errors_frame": errors}
    if len(errors):
        write_parquet(errors, os.path.join(spec.output, errors_file(index)), spec.job_id)
    write_parquet(frame, os.path.join(spec.output, partition_file(index)), spec.job_id)
    return {**summary, "file": partition_file(index), "errors_file": errors_file(index) if len(errors) else None}
