"""The Jobs page on the embedded cluster that ``run`` and ``connect()``
start: served on the dashboard they print, and linked from its top bar."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest


def _dom(url: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; scripts/install-services.sh does)")
    page = subprocess.run([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--dump-dom", url], capture_output=True, text=True, timeout=90,
                          check=False)
    assert page.returncode == 0, page.stderr[-2000:]
    return page.stdout


def test_the_embedded_cluster_serves_the_jobs_page_and_links_it(platform: Any, tiny_encoder: Path) -> None:
    dashboard = platform.dashboard_link.rsplit("/status", 1)[0]
    job = platform.submit("embed", model=str(tiny_encoder), inputs=["the cat", "sat on", "the mat"])
    job.wait()

    def listed() -> dict[str, Any] | None:
        jobs = httpx.get(f"{dashboard}/bitinglip/jobs.json", timeout=30).json()["jobs"]
        return next((j for j in jobs if j["job"] == job.id and j["state"] == "succeeded"), None)

    shown = None
    for _ in range(100):  # the last partition's event may trail the job's end by a moment
        shown = listed()
        if shown:
            break
        time.sleep(0.1)
    assert shown is not None and shown["rows_done"] == 3 == job.rows_done()

    status = _dom(f"{dashboard}/status")  # every dashboard page has the link in its top bar
    assert re.search(r'<a href="jobs">Jobs</a>', status), status[:3000]
    page = _dom(f"{dashboard}/jobs")  # where the link leads: the Jobs page
    row = re.search(rf'<tr class="job state-succeeded" data-job="{job.id}">(.*?)</tr>', page, re.DOTALL)
    assert row is not None, page[:3000]
    assert '<span class="rows">3/3</span>' in row.group(1)


def test_a_cancelled_job_shows_the_rows_done_rest_shows(redis_url: str) -> None:
    """The Jobs page and REST count a job's rows from the same events, but
    after a cancel through the gateway REST's figure stays what it was; a
    partition still running reports a few rows more, which the page must not
    show. Real scheduler, real Redis, the plugins fed through their hooks."""
    import asyncio

    import redis.asyncio as aioredis
    from distributed import Scheduler

    from bitinglip.platform.jobs.jobstore import JobStore, flat
    from bitinglip.platform.jobs.vocabulary import ANNOTATION, PROGRESS_TOPIC, task_key
    from bitinglip.platform.ops.ops_plugin import OpsPlugin
    from bitinglip.platform.ops.status_plugin import RedisStatusPlugin

    job = "c" * 32  # a REST job id, as the gateway makes them

    async def until(check: Any) -> None:
        for _ in range(200):
            if await check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the status plugin did not write in time")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        redis = aioredis.from_url(redis_url, decode_responses=True)
        store = JobStore(redis, 600)
        record = {"task": "embed", "model": "m", "rows_total": 100, "parts": 1}
        await store.create(job, "someone", record)
        async with Scheduler(port=0, dashboard_address=":0") as scheduler:
            ops, status = OpsPlugin(), RedisStatusPlugin(redis_url, 600, interval_s=0.05)
            scheduler.add_plugin(ops)
            scheduler.add_plugin(status, name=status.name)
            await ops.start(scheduler)
            await status.start(scheduler)
            key = task_key(job, 0)
            created = await store.get(job)  # the record the gateway annotates the job's tasks with
            assert created is not None
            status.update_graph(scheduler, annotations={ANNOTATION: {key: flat(created)}})
            for plugin in (ops, status):
                plugin.transition(key, "waiting", "processing")
            scheduler.log_event(PROGRESS_TOPIC, {"job": job, "part": 0, "done": 40, "total": 100})
            await until(lambda: _rows_done(store, job, 40))
            await store.transition(job, "cancelled")  # DELETE /v1/jobs/{id}
            # the partition stops at its next micro-batch, after reporting it
            scheduler.log_event(PROGRESS_TOPIC, {"job": job, "part": 0, "done": 60, "total": 100})
            await until(lambda: _finished(status, job))
            page = next(j for j in ops.snapshot()["jobs"] if j["job"] == job)
            rest = await store.get(job)
            await status.close()
            await ops.close()
        await redis.aclose()
        assert rest is not None
        return page, rest

    page, rest = asyncio.run(scenario())
    assert rest["state"] == "cancelled" and rest["rows_done"] == 40
    assert (page["state"], page["rows_done"]) == ("cancelled", 40)  # was ("running", 60)


async def _rows_done(store: Any, job: str, rows: int) -> bool:
    record = await store.get(job)
    return record is not None and record.get("rows_done") == rows


async def _finished(status: Any, job: str) -> bool:
    return job in status._finished
