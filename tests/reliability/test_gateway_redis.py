"""The REST side of failures: a gateway killed mid-job, and Redis restarted
with its data gone mid-job. The cluster keeps running the jobs; the status
comes back true from the scheduler plugin and the output manifests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from gateway.gwtools import SECRET, auth, serve, start_gateway, wait_for
from helpers import free_port, start_redis
from test_reliability import MINILM, figure, wait_until

import bitinglip
from bitinglip import redis_keys as keys
from bitinglip.platform.jobs.sample import sample_corpus
from bitinglip.settings import Rate, Settings

ROWS = 3000


@pytest.fixture
def cluster() -> Iterator[bitinglip.Platform]:
    """A cluster of each test's own: a scheduler keeps the status plugin of every Redis a gateway named, and
    one left from the previous test (its Redis killed) would be another moving part in this one."""
    with bitinglip.connect(n_workers=2, dashboard_address=":0", preload=[("embed", MINILM)]) as p:
        yield p


def scheduler_view(cluster: bitinglip.Platform, job_id: str) -> dict[str, Any]:
    """What the scheduler holds of ``job_id``: its tasks' states and the status plugins, for a failure message."""

    def look(dask_scheduler: Any) -> dict[str, Any]:
        return {"tasks": {str(k): ts.state for k, ts in dask_scheduler.tasks.items() if job_id in str(k)},
                "plugins": sorted(dask_scheduler.plugins)}

    return dict(cluster.client.run_on_scheduler(look))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A Redis of this test's own, which the test may kill: its port and process."""
    port, data = free_port(), tmp_path / "redis-a"
    data.mkdir()
    proc = start_redis(port, data)
    yield port, proc
    proc.kill()
    proc.wait(10)


def settings_for(cluster: bitinglip.Platform, redis_port: int, tmp_path: Path) -> Settings:
    return Settings(environment="test", redis_url=f"redis://127.0.0.1:{redis_port}/0",
                    scheduler_address=cluster.client.scheduler.address, jwt_secret=SECRET,
                    results_dir=tmp_path / "results", model_cache_dir=tmp_path / "cache",
                    read_rate_limit=Rate(100_000, 60.0))


def submit(url: str, h: dict[str, str], texts: list[str]) -> str:
    r = httpx.post(f"{url}/v1/jobs", headers=h, timeout=120, json={"task": "embed", "model": MINILM, "inputs": texts})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def all_rows(url: str, h: dict[str, str], job_id: str) -> list[Any]:
    ids: list[Any] = []
    offset: int | None = 0
    while offset is not None:
        page = httpx.get(f"{url}/v1/jobs/{job_id}/results?offset={offset}&limit=1000", headers=h, timeout=60).json()
        ids += [row["id"] for row in page["rows"]]
        offset = page["next_offset"]
    return ids


def id_figure(name: str, ids: list[Any], **extra: Any) -> dict[str, int]:
    import pandas as pd

    return figure(name, ROWS, pd.DataFrame({"id": ids}), None, **extra)


def test_gateway_killed_mid_job_jobs_run_on_and_a_new_gateway_reports_them(
        cluster: bitinglip.Platform, redis_server: tuple[int, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    redis_port = redis_server[0]
    settings = settings_for(cluster, redis_port, tmp_path)
    port, scheduler = free_port(), cluster.client.scheduler.address
    url, h = f"http://127.0.0.1:{port}", auth("gw-restart")
    store = redis.Redis(port=redis_port, decode_responses=True)
    first = start_gateway(port, settings, scheduler, tmp_path / "gateway.log")
    try:
        job_id = submit(url, h, sample_corpus(ROWS, seed=31))
        wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", headers=h).json()["rows_done"] > 0, timeout=120)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    killed = time.monotonic()
    done_at_kill = int(store.hget(keys.job(job_id), "rows_done") or 0)
    # no gateway at all: the scheduler plugin alone moves the record on
    wait_until(lambda: int(store.hget(keys.job(job_id), "rows_done") or 0) > done_at_kill, timeout=120)
    done_without = int(store.hget(keys.job(job_id), "rows_done") or 0)
    second = start_gateway(port, settings, scheduler, tmp_path / "gateway.log")
    try:
        down_s = time.monotonic() - killed
        seen = httpx.get(f"{url}/v1/jobs/{job_id}", headers=h).json()
        assert seen["state"] in ("running", "succeeded") and seen["rows_done"] >= done_without
        done = wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", headers=h, timeout=30).json(), timeout=300)
        assert done["state"] == "succeeded" and done["rows_done"] == done["rows_total"] == ROWS, done
        ids = all_rows(url, h, job_id)
    finally:
        second.terminate()
        second.wait(30)
    fig = id_figure("gateway-restart", ids, rows_done_at_kill=done_at_kill,
                    rows_done_with_no_gateway=done_without, seconds_without_gateway=round(down_s, 2))
    assert fig["duplicates"] == 0 and fig["lost"] == 0 and fig["rows_out"] == ROWS
    assert ids == list(range(ROWS))


def test_redis_restarted_empty_mid_job_status_is_rebuilt(
        cluster: bitinglip.Platform, redis_server: tuple[int, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    redis_port, redis_proc = redis_server
    settings = settings_for(cluster, redis_port, tmp_path)
    h = auth("redis-loss")
    with serve(settings) as url:
        def get(job_id: str) -> httpx.Response:
            return httpx.get(f"{url}/v1/jobs/{job_id}", headers=h, timeout=30)

        small = submit(url, h, sample_corpus(40, seed=32))
        small_done = wait_for(lambda: get(small).json(), fail=False)
        assert small_done["state"] == "succeeded", (small_done, scheduler_view(cluster, small))
        big = submit(url, h, sample_corpus(ROWS, seed=33))
        wait_until(lambda: get(big).json()["rows_done"] > 0, timeout=120)
        before = get(big).json()

        old_run = redis.Redis(port=redis_port).info("server")["run_id"]
        redis_proc.send_signal(signal.SIGKILL)  # with it, everything Redis held
        redis_proc.wait(10)
        lost_at = time.monotonic()
        assert get(big).status_code == 503  # no Redis: the gateway says so rather than guess
        time.sleep(1.0)
        empty_dir = tmp_path / "redis-b"
        empty_dir.mkdir()
        fresh = start_redis(redis_port, empty_dir)
        try:
            back_at = time.monotonic()
            # a new server, started on an empty folder with persistence off: it held nothing. (Asking it for
            # the job's key here would race the status plugin, which may already have written it back.)
            assert redis.Redis(port=redis_port).info("server")["run_id"] != old_run

            def true_again() -> bool:
                r = get(big)
                job = r.json() if r.status_code == 200 else {}
                return (job.get("state") in ("running", "succeeded") and job.get("rows_total") == ROWS
                        and job["rows_done"] >= before["rows_done"])

            wrong_s = wait_until(true_again, timeout=30, step=0.05)
            small_job = wait_for(lambda: get(small).json() if get(small).status_code == 200 else {"state": "?"},
                                 timeout=30)
            assert small_job["state"] == "succeeded" and small_job["rows_done"] == 40
            listed = httpx.get(f"{url}/v1/jobs", headers=h).json()
            assert {j["id"] for j in listed["jobs"]} == {small, big}
            done = wait_for(lambda: get(big).json(), timeout=300)
            assert done["state"] == "succeeded" and done["rows_done"] == done["rows_total"] == ROWS, done
            ids = all_rows(url, h, big)
            fig = id_figure("redis-loss", ids, rows_done_before_loss=before["rows_done"],
                            seconds_redis_down=round(back_at - lost_at, 2),
                            seconds_wrong_after_restart=round(wrong_s, 2))
            assert fig["duplicates"] == 0 and fig["lost"] == 0 and ids == list(range(ROWS))
        finally:
            fresh.kill()
            fresh.wait(10)

    # a Redis the scheduler never wrote to (a new plugin, no memory of these
    # jobs): a new gateway rebuilds the finished jobs from their manifests
    other_port = free_port()
    other_dir = tmp_path / "redis-c"
    other_dir.mkdir()
    other = start_redis(other_port, other_dir)
    try:
        with serve(settings_for(cluster, other_port, tmp_path)) as url:
            seconds = wait_until(lambda: httpx.get(f"{url}/v1/jobs", headers=h).json()["total"] == 2, timeout=30)
            for job_id, rows in ((small, 40), (big, ROWS)):
                job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=h).json()
                assert job["state"] == "succeeded" and job["rows_total"] == rows, job
            ids = all_rows(url, h, big)
            assert httpx.get(f"{url}/v1/jobs/{big}", headers=auth("someone-else")).status_code == 404
    finally:
        other.kill()
        other.wait(10)
    fig = id_figure("redis-loss-rebuilt-from-manifests", ids, jobs_restored=2,
                    seconds_after_gateway_start=round(seconds, 2))
    assert fig["duplicates"] == 0 and fig["lost"] == 0


def test_restore_writes_back_only_what_is_missing(redis_server: tuple[int, subprocess.Popen[bytes]]) -> None:
    """The one primitive of the rebuild, on a real Redis of its own (it flushes it)."""
    import asyncio

    import redis.asyncio as aioredis

    from bitinglip.platform.jobs.jobstore import JobStore

    async def scenario() -> None:
        r = aioredis.from_url(f"redis://127.0.0.1:{redis_server[0]}/0", decode_responses=True)
        store = JobStore(r, ttl_s=3600)
        await r.flushdb()
        await store.create("a" * 32, "ann", {"task": "embed", "options": {"k": 1}, "rows_total": 5}, "key-1")
        await store.transition("a" * 32, "running", {"rows_done": 2, "started_at": time.time()})
        await store.create("b" * 32, "ann", {"task": "embed", "rows_total": 1})
        await store.transition("b" * 32, "succeeded", {"finished_at": time.time()})
        before = {job: await r.hgetall(keys.job(job)) for job in ("a" * 32, "b" * 32)}
        assert await store.dataset_changed("")
        stamp = await store.mark_dataset()
        assert not await store.dataset_changed(stamp) and await store.mark_dataset() == stamp

        await r.flushdb()  # the loss
        assert await store.dataset_changed(stamp)
        assert [await store.restore(h) for h in before.values()] == [True, True]
        assert [await store.restore(h) for h in before.values()] == [False, False]  # never overwrites
        assert {job: await r.hgetall(keys.job(job)) for job in before} == before
        assert await r.zrange(keys.job_index("running"), 0, -1) == ["a" * 32]
        assert await r.zrange(keys.job_index("succeeded"), 0, -1) == ["b" * 32]
        assert await r.zrange(keys.owner_jobs("ann"), 0, -1) == ["a" * 32, "b" * 32]
        assert await r.get(keys.idempotency("ann", "key-1")) == "a" * 32
        assert await r.ttl(keys.job("a" * 32)) == -1 and 3500 < await r.ttl(keys.job("b" * 32)) <= 3600
        # the restored record moves on as any other
        assert await store.transition("a" * 32, "succeeded", {"finished_at": time.time()}) == "moved"
        old = {**before["b" * 32], "id": "c" * 32, "finished_at": str(time.time() - 7200)}
        assert not await store.restore(old)  # finished longer ago than the TTL: stays gone
        assert not await r.exists(keys.job("c" * 32))
        await r.flushdb()
        await r.aclose()

    asyncio.run(scenario())
