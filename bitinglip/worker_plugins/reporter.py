"""A worker plugin that tells the scheduler what each partition did and
which models the worker holds.

When a partition task (``bitinglip-{job}-{i}``) finishes, its summary (rows,
errors, tokens, batches, padding ratio, OOM splits, seconds) is read from the
worker's memory and sent as a Dask event on :data:`SUMMARY_TOPIC` with the
job's task and model; the models resident (with their measured bytes and load
times, from :class:`~bitinglip.worker_plugins.model_plugin.ModelPlugin`) and the GPU
memory in use go on :data:`WORKER_TOPIC` every ``interval_s`` when they
change.  The scheduler plugin registers this plugin on every worker.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed import WorkerPlugin

from bitinglip.platform.jobs.vocabulary import SUMMARY_TOPIC, parse_task_key

log = logging.getLogger(__name__)
WORKER_TOPIC = "bitinglip-worker"
PLUGIN_NAME = "bitinglip-reporter"
FIELDS = ("rows", "errors", "tokens", "batches", "oom_splits", "padding_ratio", "seconds", "truncated")


class ReporterPlugin(WorkerPlugin):
    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.worker: Any = None
        self._last: Any = None
        self._callback: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        self.worker = worker
        self._callback = PeriodicCallback(self.report_worker, self.interval_s * 1000)
        self._callback.start()

    def teardown(self, worker: Any) -> None:
        if self._callback is not None:
            self._callback.stop()

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        # runs on the worker's event loop for every task: return early for other keys
        started = finish == "executing"
        if not (started or (start == "executing" and finish == "memory")) or not isinstance(key, str):
            return
        parsed = parse_task_key(key)
        if parsed is None or not isinstance(parsed[1], int) or self.worker is None:
            return
        try:
            if started:
                self._report_start(key)
            else:
                self._report_part(key)
        except Exception:
            log.debug("no report for %s", key, exc_info=True)

    def _report_start(self, key: str) -> None:
        """The job's task and model, as soon as one of its partitions runs."""
        spec = _job_spec(getattr(self.worker.state.tasks.get(key), "run_spec", None))
        if spec is not None:
            self.worker.log_event(SUMMARY_TOPIC, {"job": spec.job_id, "task": spec.task.name, "model": spec.model,
                                                  "phase": "start"})

    def _report_part(self, key: str) -> None:
        summary = self.worker.data.get(key) if key in self.worker.data else None
        if not isinstance(summary, dict) or "rows" not in summary:
            return
        ts = self.worker.state.tasks.get(key)
        spec = _job_spec(getattr(ts, "run_spec", None))
        if spec is None:
            return
        msg = {"job": spec.job_id, "part": int(summary.get("part", 0)), "task": spec.task.name,
               "model": spec.model, "phase": "done", "skipped": bool(summary.get("skipped", False))}
        msg.update({name: float(summary[name]) for name in FIELDS if summary.get(name) is not None})
        self.worker.log_event(SUMMARY_TOPIC, msg)
        self.report_worker()  # a first load happened inside this partition

    def report_worker(self) -> None:
        report = self._worker_report()
        if report != self._last:
            self._last = report
            self.worker.log_event(WORKER_TOPIC, report)

    def _worker_report(self) -> dict[str, Any]:
        from bitinglip.worker_plugins.model_plugin import PLUGIN_NAME as MODELS

        report: dict[str, Any] = {"worker": self.worker.address, "models": [], "load_seconds": {}, "load_counts": {},
                                  "gpu": None}
        models = self.worker.plugins.get(MODELS)
        if models is not None:
            report["models"] = [{k: e[k] for k in ("task", "model", "dtype", "bytes")}
                                for e in models.resident_info()]
            report["load_seconds"] = {m: round(s, 4) for m, s in models.load_seconds.items()}
            report["load_counts"] = dict(models.load_counts)
            if str(models.device).startswith("cuda"):
                import torch

                report["gpu"] = {"used": int(torch.cuda.memory_reserved()),
                                 "total": int(torch.cuda.get_device_properties(0).total_memory)}
        return report


def _job_spec(run_spec: Any) -> Any:
    """The :class:`~bitinglip.platform.jobs.runner.JobSpec` among a partition task's arguments."""
    from bitinglip.platform.jobs.runner import JobSpec

    for arg in getattr(run_spec, "args", ()) or ():
        if isinstance(arg, JobSpec):
            return arg
    return None
