"""The scheduler plugin behind BitingLip's operations views.

It keeps :class:`~bitinglip.platform.ops.opsmetrics.Figures` up to date from task
transitions and the workers' events, registers the reporter worker plugin on
every worker (present and future), and serves on the Dask dashboard's HTTP
server:

- ``/bitinglip/jobs``: the Jobs page (state, progress, rows/s, ETA; models
  resident per worker and their memory),
- ``/bitinglip/jobs.json``: the same as JSON,
- ``/bitinglip/metrics``: the per-job and per-model Prometheus series.

The same series also appear in the scheduler's own ``/metrics``: one
``prometheus_client`` collector writes both pages.  ``bitinglip scheduler``
loads the plugin; on any other cluster::

    from bitinglip.platform.ops.ops_plugin import install
    install(platform.client)
"""

from __future__ import annotations

import logging
from typing import Any

import prometheus_client
from distributed.diagnostics.plugin import SchedulerPlugin

from bitinglip.platform.cluster.dask_internals import (
    add_http_routes,
    register_worker_plugin_from_scheduler,
    scheduler_plugins,
    worker_table,
)
from bitinglip.platform.jobs.vocabulary import PROGRESS_TOPIC, SUMMARY_TOPIC, parse_task_key
from bitinglip.platform.ops.opsmetrics import Collector, Figures, render
from bitinglip.platform.ops.status_plugin import RedisStatusPlugin
from bitinglip.platform.plugins.reporter import PLUGIN_NAME as REPORTER
from bitinglip.platform.plugins.reporter import WORKER_TOPIC, ReporterPlugin

log = logging.getLogger("bitinglip.ops")
PLUGIN_NAME = "bitinglip-ops"


class OpsPlugin(SchedulerPlugin):
    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.figures = Figures()
        self.scheduler: Any = None
        self._collector: Collector | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    async def start(self, scheduler: Any) -> None:
        from bitinglip.platform.ops.jobs_page import add_to_navigation, handlers

        self.scheduler = scheduler
        await register_worker_plugin_from_scheduler(scheduler, ReporterPlugin(), REPORTER)
        if add_http_routes(scheduler, handlers(self)):
            add_to_navigation(scheduler)
        collector = Collector(self.figures)
        try:
            prometheus_client.REGISTRY.register(collector)  # type: ignore[arg-type]
        except ValueError:  # a second embedded cluster in this process: the registry is per process
            log.info("another BitingLip scheduler in this process serves the per-job series of /metrics")
        else:
            self._collector = collector

    async def close(self) -> None:
        if self._collector is not None:
            prometheus_client.REGISTRY.unregister(self._collector)  # type: ignore[arg-type]
            self._collector = None

    # --- hooks: cheap, on the scheduler's event loop
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        parsed = parse_task_key(key)
        if parsed is not None:
            job, part = parsed
            before = self.figures.jobs.get(job)
            state = before.state if before else None
            self.figures.on_key(job, part, finish)
            after = self.figures.jobs.get(job)
            if after is not None and after.state != state:
                log.info("job %s", after.state, extra={"job_id": after.job, "event": f"job.{after.state}",
                                                        "task": after.task, "model": after.model})

    def log_event(self, topic: str, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        try:
            if topic == PROGRESS_TOPIC:
                self.figures.on_progress(msg)
            elif topic == SUMMARY_TOPIC:
                self.figures.on_summary(msg)
                if msg.get("phase") == "done":
                    log.info("partition done", extra={"job_id": msg.get("job"), "event": "partition.done",
                                                      **{k: msg.get(k) for k in ("part", "rows", "errors", "tokens")}})
            elif topic == WORKER_TOPIC:
                self.figures.on_worker(str(msg.get("worker") or ""), msg)
        except (KeyError, TypeError, ValueError):
            log.warning("ignored a malformed %s event: %r", topic, msg)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.figures.remove_worker(worker)

    # --- views
    def metrics_text(self) -> str:
        return render(self.figures)

    def snapshot(self) -> dict[str, Any]:
        jobs = [self._as_rest_shows(f.view()) for f in reversed(self.figures.jobs.values())]
        workers = []
        for row in (worker_table(self.scheduler) if self.scheduler else []):
            report = self.figures.workers.get(row["address"], {})
            workers.append({**row, "models": report.get("models", []), "gpu": report.get("gpu")})
        return {"jobs": jobs, "workers": workers}


    def _as_rest_shows(self, view: dict[str, Any]) -> dict[str, Any]:
        """Rows done and state as REST shows them, where the Redis status
        plugin runs on this scheduler: one figure for both views (after a
        cancel, partitions report a few rows more that REST never counts)."""
        for plugin in (scheduler_plugins(self.scheduler) if self.scheduler else ()):
            shown = plugin.shown(view["job"]) if isinstance(plugin, RedisStatusPlugin) else None
            if shown is not None:
                state, done = shown
                total = view["rows_total"]
                return {**view, "state": state, "rows_done": done,
                        "progress": round(done / total, 4) if total else 0.0}
        return view


def install(client: Any) -> None:
    """Add the plugin to the scheduler behind ``client`` (idempotent)."""
    client.register_plugin(OpsPlugin())
