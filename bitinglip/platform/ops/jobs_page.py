"""The Jobs page of the Dask dashboard: tornado handlers that the ops
scheduler plugin adds to the scheduler's HTTP server.

The page is rendered on the server and refreshes itself every
``REFRESH_S`` seconds, so it needs no JavaScript and works wherever the
dashboard does (behind a proxy too, as its links are relative).
"""

from __future__ import annotations

import json
import time
from html import escape
from typing import Any

from tornado.web import RequestHandler

REFRESH_S = 2


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""  # pragma: no cover


def _total(total: int | None, estimated: bool | None) -> str:
    if total is None:
        return "?"
    return f'<span title="an estimate until every partition has started">~{total}</span>' if estimated else str(total)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f} min"


def page(snapshot: dict[str, Any]) -> str:
    rows = []
    for job in snapshot["jobs"]:
        total = job["rows_total"]
        pct = round(100 * job["progress"])
        rows.append(
            f'<tr class="job state-{escape(job["state"])}" data-job="{escape(job["job"])}">'
            f'<td class="id" title="{escape(job["job"])}">{escape(job["job"][:12])}</td>'
            f'<td>{escape(job["task"])}</td><td>{escape(job["model"])}</td>'
            f'<td class="state">{escape(job["state"])}</td>'
            f'<td class="progress"><progress max="100" value="{pct}"></progress> '
            f'<span class="rows">{job["rows_done"]}/{_total(total, job.get("rows_total_estimated"))}</span> ({pct}%)</td>'
            f'<td>{job["partitions_done"]}/{job["partitions"]}</td>'
            f'<td class="rate">{job["rows_per_s"]:.1f}</td><td class="eta">{_eta(job["eta_s"])}</td>'
            f'<td class="reused">{job.get("rows_reused", 0)}</td><td>{job["rows_in_error"]}</td></tr>')
    workers = []
    for w in snapshot["workers"]:
        # each model with what its worker chose for it: the generation engine, the embed matmul precision,
        # the micro-batch token budget, the worker's torch threads
        models = ", ".join(f'{escape(m["task"])}:{escape(m["model"])} ({_size(m["bytes"])}'
                           + "".join(f", {escape(str(m[k]))}" for k in ("engine", "matmul_precision") if m.get(k))
                           + (f', budget {int(m["token_budget"])}' if m.get("token_budget") else "")
                           + (f', {int(m["torch_threads"])} thread{"s" * (int(m["torch_threads"]) != 1)}'
                              if m.get("torch_threads") else "")
                           + ")" for m in w["models"])
        gpu = f'{_size(w["gpu"]["used"])} / {_size(w["gpu"]["total"])}' if w.get("gpu") else "-"
        workers.append(f'<tr class="worker"><td>{escape(w["name"])}</td><td>{escape(w["address"])}</td>'
                       f'<td>{escape(", ".join(f"{k}={v:g}" for k, v in w["resources"].items()) or "-")}</td>'
                       f'<td>{_size(w["memory_bytes"])}</td><td>{gpu}</td><td class="models">{models or "-"}</td></tr>')
    empty_jobs = '<tr><td colspan="10">no jobs yet</td></tr>'
    empty_workers = '<tr><td colspan="6">no workers</td></tr>'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>BitingLip jobs</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
th {{ background: #f3f3f3; }}
.state-failed .state {{ color: #b00; }} .state-succeeded .state {{ color: #070; }}
.state-running .state {{ color: #06c; }}
</style></head>
<body>
<h1>BitingLip jobs</h1>
<p><a href="../status">Dask dashboard</a> &middot; <a href="jobs.json">JSON</a> &middot;
<a href="metrics">metrics</a> &middot; updated {time.strftime("%H:%M:%S")}</p>
<table id="jobs"><thead><tr><th>job</th><th>task</th><th>model</th><th>state</th><th>progress</th>
<th>partitions</th><th>rows/s</th><th>ETA</th><th title="taken from the result store, not run">rows reused</th>
<th>rows in error</th></tr></thead>
<tbody>{"".join(rows) or empty_jobs}</tbody></table>
<h2>Workers</h2>
<table id="workers"><thead><tr><th>name</th><th>address</th><th>resources</th><th>memory</th><th>GPU memory</th>
<th>models resident</th></tr></thead>
<tbody>{"".join(workers) or empty_workers}</tbody></table>
</body></html>
"""


class ToJobs(RequestHandler):
    """``/jobs``, the dashboard's navigation entry, is the Jobs page."""

    def get(self) -> None:
        self.redirect("bitinglip/jobs")


class _Base(RequestHandler):
    def initialize(self, plugin: Any) -> None:
        self.plugin = plugin


class JobsPage(_Base):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(page(self.plugin.snapshot()))


class JobsJSON(_Base):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self.plugin.snapshot()))


class Metrics(_Base):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4")
        self.write(self.plugin.metrics_text())


def add_to_navigation(scheduler: Any) -> None:
    """Link the Jobs page from the top bar of every dashboard page.

    Through Dask's private API (:func:`dask_internals.add_dashboard_page`);
    tests/unit/test_dask_internals.py and tests/ops/test_jobs_page.py fail
    loudly if an upgrade moves it."""
    from bitinglip.platform.cluster.dask_internals import add_dashboard_page

    add_dashboard_page(scheduler, "jobs")  # rendered as <a href="jobs">Jobs</a>; /jobs redirects to the page


def handlers(plugin: Any) -> list[tuple[str, type[RequestHandler], dict[str, Any]]]:
    """Routes for :func:`dask_internals.add_http_routes`."""
    return [(r"/jobs", ToJobs),
            (r"/bitinglip/jobs", JobsPage, {"plugin": plugin}),
            (r"/bitinglip/jobs\.json", JobsJSON, {"plugin": plugin}),
            (r"/bitinglip/metrics", Metrics, {"plugin": plugin})]
