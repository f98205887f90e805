"""Per-job and per-model figures that Dask's own ``/metrics`` lacks.

:class:`Figures` is pure bookkeeping, fed by the scheduler plugin
(:mod:`bitinglip.platform.ops.ops_plugin`) from task transitions and the
workers' events: progress (``bitinglip-progress``), partition summaries and
model residency (both sent by :mod:`bitinglip.platform.plugins.reporter`).
:meth:`Figures.families` turns them into Prometheus metric families and
:class:`Collector` hands those to ``prometheus_client``: registered in the
scheduler process it adds them to Dask's own ``/metrics``, and :func:`render`
writes the same collector's series for ``/bitinglip/metrics`` (one writer,
so the two pages cannot disagree).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bitinglip.platform.jobs.vocabulary import MANIFEST_PART, TERMINAL, JobState, rate_and_eta

#: finished jobs kept (and exported with a ``job`` label); older ones are dropped to bound label cardinality
FINISHED_KEPT = 200
SUM_FIELDS = ("rows", "errors", "tokens", "batches", "oom_splits", "rows_reused")


@dataclass
class JobFigures:
    job: str
    task: str = "unknown"
    model: str = "unknown"
    state: str = JobState.QUEUED.value
    parts: set[int] = field(default_factory=set)
    parts_done: set[int] = field(default_factory=set)
    has_manifest: bool = False
    done: dict[int, int] = field(default_factory=dict)
    totals: dict[int, int] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUM_FIELDS, 0))
    padded_tokens: float = 0.0
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    last_progress_at: float | None = None

    @property
    def rows_done(self) -> int:
        return sum(self.done.values())

    @property
    def rows_total(self) -> int | None:
        """Rows of the job: exact once every partition has reported, else an estimate."""
        if not self.totals:
            return None
        known = sum(self.totals.values())
        missing = len(self.parts) - len(self.totals)
        return known + round(missing * known / len(self.totals)) if missing > 0 else known

    @property
    def padding_ratio(self) -> float:
        return self.padded_tokens / self.sums["tokens"] if self.sums["tokens"] else 1.0

    @property
    def batch_rows(self) -> float:
        """Mean rows per micro-batch."""
        return (self.sums["rows"] + self.sums["errors"]) / self.sums["batches"] if self.sums["batches"] else 0.0

    def rate_and_eta(self, now: float | None = None) -> tuple[float, float | None]:
        end = self.finished_at or now or time.time()
        return rate_and_eta(self.rows_done, self.rows_total, self.started_at, end, self.state)

    def rate(self, now: float | None = None) -> float:
        return self.rate_and_eta(now)[0]

    def view(self) -> dict[str, Any]:
        total = self.rows_total
        rate, eta = self.rate_and_eta(time.time())
        return {"job": self.job, "task": self.task, "model": self.model, "state": self.state,
                "partitions": len(self.parts), "partitions_done": len(self.parts_done),
                "rows_done": self.rows_done, "rows_total": total,
                # partitions not started yet are estimated from those that did (lazy files count their rows as
                # they read them): shown as an estimate, never as the job's count
                "rows_total_estimated": total is not None and len(self.totals) < len(self.parts),
                "progress": round(self.rows_done / total, 4) if total else 0.0,
                "rows_per_s": round(rate, 2), "eta_s": _round(eta),
                "rows": int(self.sums["rows"]), "rows_in_error": int(self.sums["errors"]),
                "rows_reused": int(self.sums["rows_reused"]),
                "tokens": int(self.sums["tokens"]), "batches": int(self.sums["batches"]),
                "oom_splits": int(self.sums["oom_splits"]), "padding_ratio": round(self.padding_ratio, 4),
                "submitted_at": self.submitted_at, "started_at": self.started_at, "finished_at": self.finished_at}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True)
class Family:
    """One Prometheus metric family: ``samples`` are (label values, value)."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    labels: tuple[str, ...]
    samples: Sequence[tuple[tuple[str, ...], float]]


class Figures:
    """Jobs, models and workers as the scheduler sees them. Not thread-safe:
    the scheduler's event loop is its only writer and reader."""

    def __init__(self) -> None:
        self.jobs: OrderedDict[str, JobFigures] = OrderedDict()
        self.finished: dict[str, int] = dict.fromkeys(TERMINAL, 0)
        self.by_model: dict[tuple[str, str], dict[str, float]] = {}
        #: worker address -> its last report: {"models": [...], "load_seconds": {...}, "gpu": {...}}
        self.workers: dict[str, dict[str, Any]] = {}

    def job(self, job_id: str) -> JobFigures:
        figures = self.jobs.get(job_id)
        if figures is None:
            figures = self.jobs[job_id] = JobFigures(job_id)
        return figures

    # --- what the scheduler plugin feeds in
    def on_key(self, job_id: str, part: int | str, finish: str) -> None:
        """A task of a job changed state on the scheduler (``part``: a partition's index, or ``"manifest"``)."""
        figures = self.job(job_id)
        if part == MANIFEST_PART:
            figures.has_manifest = True
        else:
            figures.parts.add(int(part))
        if figures.state in TERMINAL:
            return
        now = time.time()
        if finish == "processing" and figures.state == JobState.QUEUED.value:
            figures.state, figures.started_at = JobState.RUNNING.value, figures.started_at or now
        elif finish == "memory" and part != MANIFEST_PART:
            figures.parts_done.add(int(part))
            figures.done[int(part)] = figures.totals.get(int(part), figures.done.get(int(part), 0))
        if finish == "erred":
            self._finish(figures, JobState.FAILED.value)
        elif finish == "forgotten" and not (part == MANIFEST_PART or int(part) in figures.parts_done):
            self._finish(figures, JobState.CANCELLED.value)
        elif finish == "memory" and (part == MANIFEST_PART or (
                not figures.has_manifest and figures.parts and figures.parts_done == figures.parts)):
            self._finish(figures, JobState.SUCCEEDED.value)

    def on_progress(self, msg: dict[str, Any]) -> None:
        figures = self.job(str(msg["job"]))
        part = int(msg.get("part", 0))
        figures.parts.add(part)
        figures.done[part] = max(figures.done.get(part, 0), int(msg.get("done", 0)))
        figures.totals[part] = int(msg.get("total", 0))
        figures.last_progress_at = time.time()
        if figures.state == JobState.QUEUED.value:
            figures.state, figures.started_at = JobState.RUNNING.value, figures.started_at or figures.last_progress_at

    def on_summary(self, msg: dict[str, Any]) -> None:
        """A partition started (``phase`` "start": the job's task and model)
        or finished on a worker (its rows, errors, tokens, batches...)."""
        figures = self.job(str(msg["job"]))
        figures.task, figures.model = str(msg.get("task") or figures.task), str(msg.get("model") or figures.model)
        if msg.get("phase") == "start":
            return
        model = self.by_model.setdefault((figures.task, figures.model), dict.fromkeys(SUM_FIELDS, 0))
        for name in SUM_FIELDS:
            value = float(msg.get(name) or 0)
            figures.sums[name] += value
            model[name] += value
        figures.padded_tokens += float(msg.get("padding_ratio") or 1.0) * float(msg.get("tokens") or 0)

    def on_worker(self, address: str, report: dict[str, Any]) -> None:
        self.workers[address] = report

    def remove_worker(self, address: str) -> None:
        self.workers.pop(address, None)

    def _finish(self, figures: JobFigures, state: str) -> None:
        figures.state, figures.finished_at = state, time.time()
        self.finished[state] += 1
        ended = [j for j, f in self.jobs.items() if f.state in TERMINAL]
        for job_id in ended[:max(0, len(ended) - FINISHED_KEPT)]:
            del self.jobs[job_id]

    # --- what goes out
    def families(self) -> list[Family]:
        now = time.time()
        jobs = list(self.jobs.values())
        labels = ("job", "task", "model")

        def per_job(name: str, kind: str, help: str, value: Any) -> Family:
            return Family(name, kind, help, labels, [((f.job, f.task, f.model), float(value(f))) for f in jobs])

        active = {s: sum(1 for f in jobs if f.state == s) for s in (JobState.QUEUED.value, JobState.RUNNING.value)}
        out = [
            Family("bitinglip_jobs_active", "gauge", "Jobs on the cluster that have not ended, by state.",
                   ("state",), [((s,), n) for s, n in active.items()]),
            Family("bitinglip_jobs_finished_total", "counter", "Jobs that ended since the scheduler started, by state.",
                   ("state",), [((s,), n) for s, n in self.finished.items()]),
            per_job("bitinglip_job_running", "gauge", "1 while the job runs, else 0.",
                    lambda f: f.state == JobState.RUNNING.value),
            per_job("bitinglip_job_rows_done", "gauge", "Rows done so far (progress events).", lambda f: f.rows_done),
            per_job("bitinglip_job_rows_expected", "gauge", "Rows of the job (an estimate until every partition "
                    "has started).", lambda f: f.rows_total or 0),
            per_job("bitinglip_job_rows_total", "counter", "Rows written by finished partitions.",
                    lambda f: f.sums["rows"]),
            per_job("bitinglip_job_rows_in_error_total", "counter", "Rows that failed (the errors table).",
                    lambda f: f.sums["errors"]),
            per_job("bitinglip_job_tokens_total", "counter", "Tokens processed.", lambda f: f.sums["tokens"]),
            per_job("bitinglip_job_batches_total", "counter", "Micro-batches planned.", lambda f: f.sums["batches"]),
            per_job("bitinglip_job_oom_splits_total", "counter", "Batches split after running out of memory.",
                    lambda f: f.sums["oom_splits"]),
            per_job("bitinglip_job_batch_rows", "gauge", "Mean rows per micro-batch.", lambda f: f.batch_rows),
            per_job("bitinglip_job_padding_ratio", "gauge", "Padded tokens over real tokens (1 is no padding).",
                    lambda f: f.padding_ratio),
            per_job("bitinglip_job_rows_per_second", "gauge", "Rows per second since the job started.",
                    lambda f: f.rate(now)),
            per_job("bitinglip_job_seconds_since_progress", "gauge", "Seconds since the last progress event.",
                    lambda f: now - (f.last_progress_at or f.started_at or f.submitted_at)
                    if f.state not in TERMINAL else 0),
        ]
        models = sorted(self.by_model.items())
        for name, help in (("rows", "Rows written"), ("errors", "Rows in error"), ("tokens", "Tokens processed"),
                           ("batches", "Micro-batches"), ("oom_splits", "Out-of-memory batch splits")):
            metric = "bitinglip_model_rows_in_error_total" if name == "errors" else f"bitinglip_model_{name}_total"
            out.append(Family(metric, "counter", f"{help}, by task and model.", ("task", "model"),
                              [((t, m), v[name]) for (t, m), v in models]))
        resident, loads, load_s, gpu_used, gpu_total = [], [], [], [], []
        kv_bytes, kv_usage, running, runtime = [], [], [], []
        for address, report in sorted(self.workers.items()):
            for entry in report.get("models", []):
                resident.append(((address, entry["task"], entry["model"], str(entry.get("dtype"))),
                                 float(entry["bytes"])))
                # what the worker chose for the model: its engine, its matmul precision, its micro-batch token
                # budget, its worker's torch threads ("" where none applies)
                runtime.append(((address, entry["task"], entry["model"], str(entry.get("engine", "")),
                                 str(entry.get("matmul_precision", "")), str(entry.get("token_budget", "")),
                                 str(entry.get("torch_threads", ""))), 1.0))
                if "engine" in entry:  # a generation engine: its KV cache and the requests it runs
                    labels = (address, entry["model"], str(entry["engine"]))
                    kv_bytes.append((labels, float(entry.get("kv_cache_bytes", 0.0))))
                    kv_usage.append((labels, float(entry.get("kv_cache_usage", 0.0))))
                    running.append((labels, float(entry.get("running", 0.0))))
            for model, seconds in report.get("load_seconds", {}).items():
                load_s.append(((address, model), float(seconds)))
            for model, count in report.get("load_counts", {}).items():
                loads.append(((address, model), float(count)))
            gpu = report.get("gpu") or {}
            if gpu:
                gpu_used.append(((address,), float(gpu["used"])))
                gpu_total.append(((address,), float(gpu["total"])))
        out += [
            Family("bitinglip_model_resident_bytes", "gauge", "Bytes a resident model takes on a worker (measured).",
                   ("worker", "task", "model", "dtype"), resident),
            Family("bitinglip_model_runtime_info", "gauge", "1 per resident model, labelled with the engine, the "
                   "matmul precision, the token budget and the torch threads its worker chose.",
                   ("worker", "task", "model", "engine", "matmul_precision", "token_budget", "torch_threads"),
                   runtime),
            Family("bitinglip_model_load_seconds", "gauge", "Seconds the last load of a model took on a worker.",
                   ("worker", "model"), load_s),
            Family("bitinglip_model_loads_total", "counter", "Model loads on a worker.", ("worker", "model"), loads),
            Family("bitinglip_model_kv_cache_bytes", "gauge", "Bytes of KV cache a generation engine holds.",
                   ("worker", "model", "engine"), kv_bytes),
            Family("bitinglip_model_kv_cache_usage", "gauge", "Share of a generation engine's KV cache in use (0-1).",
                   ("worker", "model", "engine"), kv_usage),
            Family("bitinglip_model_requests_running", "gauge", "Requests a generation engine holds (running or "
                   "waiting).", ("worker", "model", "engine"), running),
            Family("bitinglip_worker_gpu_memory_used_bytes", "gauge", "GPU memory torch holds on a worker.",
                   ("worker",), gpu_used),
            Family("bitinglip_worker_gpu_memory_total_bytes", "gauge", "GPU memory of a worker's device.",
                   ("worker",), gpu_total),
        ]
        return out


class Collector:
    """A ``prometheus_client`` collector over :class:`Figures`; registered in
    the scheduler process, it adds our series to Dask's ``/metrics``."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Any]:
        for fam in self.figures.families():
            # prometheus_client appends _total to counters itself
            if fam.kind == "counter":
                metric: Any = CounterMetricFamily(fam.name.removesuffix("_total"), fam.help, labels=fam.labels)
            else:
                metric = GaugeMetricFamily(fam.name, fam.help, labels=fam.labels)
            for values, value in fam.samples:
                metric.add_metric(list(values), value)
            yield metric

    def describe(self) -> list[Any]:
        return []  # no fixed set: prometheus_client then never calls collect() at registration


def render(figures: Figures) -> str:
    """The Prometheus text format (version 0.0.4) of :class:`Collector`'s series alone."""
    registry = CollectorRegistry()
    registry.register(Collector(figures))  # type: ignore[arg-type]
    return generate_latest(registry).decode()
