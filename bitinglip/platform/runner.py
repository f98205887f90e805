"""What runs on a worker for one partition of a job.

``run_partition`` takes the partition's rows, reaches the model through the
worker plugin, tokenizes, cuts micro-batches by token budget, predicts,
restores input order, and returns a DataFrame (or writes it to Parquet
atomically and returns a summary).  Progress goes to the scheduler as Dask
events on one topic; a cancelled job is noticed between micro-batches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from bitinglip.platform.batching import default_budget, padding_ratio, plan_batches
from bitinglip.platform.errors import JobCancelledError
from bitinglip.platform.tasks import Batch, TaskType, texts_or_error

PROGRESS_TOPIC = "bitinglip-progress"
PROGRESS_INTERVAL_S = 0.5
CANCEL_CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class JobSpec:
    """Everything a partition needs to know about its job; small to pickle."""

    job_id: str
    task: TaskType
    model: str
    options: Mapping[str, Any] = field(default_factory=dict)
    text_column: str = "text"
    token_budget: int = 0
    output: str | None = None


def partition_file(index: int) -> str:
    return f"part-{index:05d}.parquet"


def cancel_event_name(job_id: str) -> str:
    return f"bitinglip-cancel-{job_id}"


class _Reporter:
    """Sends progress events and checks for cancellation, both throttled."""

    def __init__(self, spec: JobSpec, index: int, total: int) -> None:
        self.spec, self.index, self.total = spec, index, total
        self.worker = _current_worker()
        self.last_sent = self.last_check = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.worker is not None and (final or now - self.last_sent >= PROGRESS_INTERVAL_S):
            self.last_sent = now
            self.worker.log_event(PROGRESS_TOPIC, {"job": self.spec.job_id, "part": self.index,
                                                   "done": done, "total": self.total})
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


def _rows(data: Any, spec: JobSpec, offset: int) -> tuple[list[Any], list[str]]:
    if isinstance(data, pd.DataFrame):
        if spec.text_column not in data.columns:
            raise_missing_column(spec.text_column, list(data.columns))
        ids = data["id"].tolist() if "id" in data.columns else list(range(offset, offset + len(data)))
        return ids, texts_or_error(data[spec.text_column].tolist(), ids)
    values = list(data)
    ids = list(range(offset, offset + len(values)))
    return ids, texts_or_error(values, ids)


def raise_missing_column(column: str, columns: list[Any]) -> None:
    from bitinglip.platform.errors import InputError

    raise InputError(f"the input has no column {column!r} (columns: {', '.join(map(str, columns))}); "
                     "name the text column with text_column=")


def predict_rows(task: TaskType, loaded: Any, texts: list[str], options: Mapping[str, Any],
                 budget: int, reporter: _Reporter | None = None) -> tuple[list[dict[str, Any]], list[bool], dict[str, float]]:
    """Outputs for ``texts`` in their order, the truncation flags, and stats."""
    ids, truncated = task.tokenize(loaded, texts, options)
    costs = [task.batch_cost(len(row), options) for row in ids]
    batches = plan_batches(costs, budget)
    outputs: list[dict[str, Any]] = [{}] * len(texts)
    done = 0
    for rows in batches:
        results = task.predict(loaded, Batch([texts[i] for i in rows], [ids[i] for i in rows]), options)
        if len(results) != len(rows):
            raise RuntimeError(f"task {task.name!r} returned {len(results)} outputs for {len(rows)} inputs")
        for i, result in zip(rows, results):
            outputs[i] = result
        done += len(rows)
        if reporter is not None:
            reporter.update(done)
    stats = {"batches": len(batches), "tokens": sum(len(r) for r in ids),
             "padding_ratio": padding_ratio(costs, batches)}
    return outputs, truncated, stats


def run_partition(data: Any, spec: JobSpec, index: int, offset: int) -> Any:
    """Run one partition on this worker. Returns a DataFrame, or with an
    output directory a summary dict after the Parquet file is in place."""
    from bitinglip.worker_plugins.models import get_model_plugin

    started = time.perf_counter()
    ids, texts = _rows(data, spec, offset)
    reporter = _Reporter(spec, index, len(texts))
    columns: dict[str, list[Any]] = {"id": ids}
    stats: dict[str, float] = {"batches": 0, "tokens": 0, "padding_ratio": 1.0}
    if texts:
        plugin = get_model_plugin()
        loaded = plugin.get(spec.task, spec.model, spec.options)
        budget = spec.token_budget or default_budget(loaded.device)
        outputs, truncated, stats = predict_rows(spec.task, loaded, texts, spec.options, budget, reporter)
        names = list(spec.task.columns) + sorted({k for o in outputs for k in o} - set(spec.task.columns))
        for name in names:
            columns[name] = [o.get(name) for o in outputs]
        columns["truncated"] = truncated
    else:
        for name in spec.task.columns:
            columns[name] = []
        columns["truncated"] = []
    frame = pd.DataFrame(columns)
    reporter.update(len(texts), final=True)
    if spec.output is None:
        return frame
    path = os.path.join(spec.output, partition_file(index))
    tmp = f"{path}.tmp-{os.getpid()}"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return {"part": index, "rows": len(frame), "file": partition_file(index),
            "truncated": int(frame["truncated"].sum()), "seconds": time.perf_counter() - started, **stats}
