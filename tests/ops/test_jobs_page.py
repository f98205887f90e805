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
    # the workers table names what each worker chose for the model: embed's timed matmul precision, budget and threads
    assert re.search(r'class="models">[^<]*embed:[^<]*, (highest|medium), budget \d+, \d+ threads?\)', page), page[-3000:]


def test_a_cancelled_job_shows_the_rows_done_rest_shows(redis_url: str) -> None:
    """The Jobs page and REST count a job's rows from the same events, but
    after a cancel through the gateway REST's figure stays what it was; a
    partition still running reports a few rows more, which the page must not
    show. Real scheduler, real Redis, the plugins fed through their hooks.

    The scenario runs in a fresh interpreter: a scheduler started on a second
    event loop of a process that already ran the rest of the suite hung at
    times (three CI runs), and each step has its own deadline so a stall
    names the step.  The scheduler's close also stalled here in full runs:
    the status plugin's writer could miss its cancel (fixed; see
    tests/unit/test_status_plugin_close.py)."""
    import json
    import sys

    run = subprocess.run([sys.executable, __file__, redis_url], capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    page, rest = json.loads(run.stdout.strip().splitlines()[-1])
    assert rest["state"] == "cancelled" and rest["rows_done"] == 40
    assert (page["state"], page["rows_done"]) == ("cancelled", 40)  # was ("running", 60)


def _cancel_scenario(redis_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import asyncio

    import redis.asyncio as aioredis
    from distributed import Scheduler

    from bitinglip.platform.jobs.jobstore import JobStore, flat
    from bitinglip.platform.jobs.vocabulary import ANNOTATION, PROGRESS_TOPIC, task_key
    from bitinglip.platform.ops.ops_plugin import OpsPlugin
    from bitinglip.platform.ops.status_plugin import RedisStatusPlugin

    job = "c" * 32  # a REST job id, as the gateway makes them

    async def step(what: str, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, 60)
        except TimeoutError:
            raise AssertionError(f"stalled: {what}") from None

    async def until(check: Any) -> None:
        for _ in range(400):
            if await check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the status plugin did not write in time")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        redis = aioredis.from_url(redis_url, decode_responses=True)
        store = JobStore(redis, 600)
        record = {"task": "embed", "model": "m", "rows_total": 100, "parts": 1}
        await step("create the job", store.create(job, "someone", record))
        scheduler = Scheduler(port=0, dashboard_address=":0")
        await step("start the scheduler", scheduler)
        try:
            ops, status = OpsPlugin(), RedisStatusPlugin(redis_url, 600, interval_s=0.05)
            scheduler.add_plugin(ops)
            scheduler.add_plugin(status, name=status.name)
            await step("start the ops plugin", ops.start(scheduler))
            await step("start the status plugin", status.start(scheduler))
            key = task_key(job, 0)
            created = await step("read the job", store.get(job))  # what the gateway annotates tasks with
            assert created is not None
            status.update_graph(scheduler, annotations={ANNOTATION: {key: flat(created)}})
            for plugin in (ops, status):
                plugin.transition(key, "waiting", "processing")
            scheduler.log_event(PROGRESS_TOPIC, {"job": job, "part": 0, "done": 40, "total": 100})
            await step("rows done 40", until(lambda: _rows_done(store, job, 40)))
            await step("cancel", store.transition(job, "cancelled"))  # DELETE /v1/jobs/{id}
            # the partition stops at its next micro-batch, after reporting it
            scheduler.log_event(PROGRESS_TOPIC, {"job": job, "part": 0, "done": 60, "total": 100})
            await step("the plugin sees the cancel", until(lambda: _finished(status, job)))
            page = next(j for j in ops.snapshot()["jobs"] if j["job"] == job)
            rest = await step("read the job again", store.get(job))
        finally:
            await step("close the scheduler", scheduler.close())
        await redis.aclose()
        assert rest is not None
        return page, rest

    return asyncio.run(scenario())


async def _rows_done(store: Any, job: str, rows: int) -> bool:
    record = await store.get(job)
    return record is not None and record.get("rows_done") == rows


async def _finished(status: Any, job: str) -> bool:
    return job in status._finished


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(_cancel_scenario(sys.argv[1]), default=str))
