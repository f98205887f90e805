"""A worker plugin that tells the scheduler which models the worker holds.

The models resident (with their measured bytes and load times, from
:class:`~bitinglip.platform.plugins.model_plugin.ModelPlugin`) and the GPU memory
in use go on :data:`WORKER_TOPIC` every ``interval_s`` when they change, and
after each partition task.  (Partitions send their own summaries: see
``bitinglip.platform.jobs.vocabulary.SUMMARY_TOPIC``.)  The scheduler plugin
registers this plugin on every worker.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed import WorkerPlugin

log = logging.getLogger(__name__)
WORKER_TOPIC = "bitinglip-worker"
PLUGIN_NAME = "bitinglip-reporter"
#: what a generation engine reports beside its model (see ModelPlugin.resident_info)
ENGINE_FIGURES = ("engine", "kv_cache_bytes", "kv_cache_usage", "running")


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
        # a partition that just ran may have loaded a model: report now rather
        # than at the next tick.  Runs on the event loop for every task: keep it cheap
        if start == "executing" and isinstance(key, str) and key.startswith("bitinglip-") \
                and self.worker is not None:
            try:
                self.report_worker()
            except Exception:
                log.debug("no worker report after %s", key, exc_info=True)

    def report_worker(self) -> None:
        report = self._worker_report()
        if report != self._last:
            self._last = report
            self.worker.log_event(WORKER_TOPIC, report)

    def _worker_report(self) -> dict[str, Any]:
        from bitinglip.platform.plugins.model_plugin import PLUGIN_NAME as MODELS
        from bitinglip.platform.plugins.model_plugin import RUNTIME_FIGURES

        report: dict[str, Any] = {"worker": self.worker.address, "models": [], "load_seconds": {}, "load_counts": {},
                                  "gpu": None}
        models = self.worker.plugins.get(MODELS)
        if models is not None:
            report["models"] = [{k: e[k] for k in ("task", "model", "dtype", "bytes", *RUNTIME_FIGURES,
                                                   *ENGINE_FIGURES) if k in e}
                                for e in models.resident_info()]
            report["load_seconds"] = {m: round(s, 4) for m, s in models.load_seconds.items()}
            report["load_counts"] = dict(models.load_counts)
            if str(models.device).startswith("cuda"):
                import torch

                report["gpu"] = {"used": int(torch.cuda.memory_reserved()),
                                 "total": int(torch.cuda.get_device_properties(0).total_memory)}
        return report

