"""Issue 14's findings against the gateway (and issue 13's REST items):
Redis pool, submissions beside busy workers, rate buckets, idempotency keys
of two subjects, a full results disk, addresses in 503s, slow clients,
partial results and resume.  All on the session's live gateway, Redis and
Dask cluster, unless a test needs a gateway of its own."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gwtools import SECRET, auth, free_port, get_json, new_user, wait_for

from bitinglip.settings import Settings

TEXTS = [f"row {i}: a sentence to embed {i % 5}" for i in range(40)]


def user() -> str:
    return new_user("hard")


# --- 14.5: a pool sized to the gateway's concurrency

def test_300_concurrent_reads_all_succeed(gateway: str) -> None:
    h = auth(user())

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            got = await asyncio.gather(*(client.get(f"{gateway}/v1/jobs", headers=h) for _ in range(300)))
        return [r.status_code for r in got]

    statuses = asyncio.run(run())
    assert statuses.count(200) == 300, {s: statuses.count(s) for s in set(statuses)}


# --- 13.10: online inference has its own bucket; invalid requests use up nothing

def test_eleven_infer_calls_in_a_minute_pass(gateway: str, models: dict[str, str]) -> None:
    h = auth(user())
    for i in range(11):
        r = httpx.post(f"{gateway}/v1/infer", headers=h, timeout=60,
                       json={"task": "embed", "model": "tiny-encoder", "inputs": [f"text {i}"]})
        assert r.status_code == 200, (i, r.text)
    assert int(r.headers["x-ratelimit-limit"]) == 600
    # nor did they touch the submission bucket
    r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60,
                   json={"task": "embed", "model": "tiny-encoder", "inputs": ["one"]})
    assert r.status_code == 202 and r.headers["x-ratelimit-remaining"] == "9", r.text


def test_invalid_submissions_do_not_use_up_the_limit(gateway: str, models: dict[str, str]) -> None:
    h = auth(user())
    for _ in range(12):  # over the limit of 10, all refused as invalid
        r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60,
                       json={"task": "embed", "model": "tiny-encoder", "inputs": []})
        assert r.status_code == 422, r.text
    r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60,
                   json={"task": "embed", "model": "tiny-encoder", "inputs": ["valid"]})
    assert r.status_code == 202, r.text
    assert r.headers["x-ratelimit-remaining"] == "9"


# --- 14.8: idempotency keys of two subjects never meet

def test_idempotency_keys_with_colons_stay_apart(gateway: str, models: dict[str, str]) -> None:
    tag = uuid.uuid4().hex[:6]
    first, second = auth(f"{tag}:x"), auth(tag)
    body = {"task": "embed", "model": "tiny-encoder", "inputs": ["a"]}
    a = httpx.post(f"{gateway}/v1/jobs", headers=first, timeout=60, json={**body, "idempotency_key": "k"})
    assert a.status_code == 202, a.text
    # subject "<tag>" with key "x:k" used to build the same Redis key as "<tag>:x" with "k"
    b = httpx.post(f"{gateway}/v1/jobs", headers=second, timeout=60, json={**body, "idempotency_key": "x:k"})
    assert b.status_code == 202, b.text
    assert "idempotent-replayed" not in b.headers
    assert b.json()["id"] != a.json()["id"] and a.json()["id"] not in b.text
    again = httpx.post(f"{gateway}/v1/jobs", headers=first, timeout=60, json={**body, "idempotency_key": "k"})
    assert again.json()["id"] == a.json()["id"] and again.headers["idempotent-replayed"] == "true"


# --- 14.8: a full results disk is the gateway's storage, not the cluster

def test_full_results_disk_is_507_not_the_cluster(gw_settings: Settings, models: dict[str, str],
                                                  platform: Any, tmp_path: Path) -> None:
    port = free_port()
    results = tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "REDIS_URL": gw_settings.redis_url or "", "BITINGLIP_JWT_SECRET": SECRET,
           "BITINGLIP_RESULTS_DIR": str(results), "MODEL_CACHE_DIR": str(gw_settings.model_cache_dir),
           "ENVIRONMENT": "test"}

    proc = subprocess.Popen([sys.executable, "-m", "bitinglip", "gateway", "--port", str(port), "--scheduler",
                             platform.client.scheduler.address, "--no-access-log"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # a real write failure: EFBIG past 256 bytes (Python ignores SIGXFSZ); set long before the gateway is up
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (256, 256))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, "the gateway exited"
            try:
                if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the gateway did not start"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/jobs", headers=auth(user()), timeout=60,
                       json={"task": "embed", "model": "tiny-encoder", "inputs": ["x" * 400]})
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert error["code"] == "output_write_failed"
        assert "results folder" in error["message"] and "cluster" not in error["message"]
    finally:
        proc.terminate()
        proc.wait(30)


# --- 14.8: 503s do not name the cluster's addresses

def test_5xx_messages_name_no_worker_address(caplog: pytest.LogCaptureFixture) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from bitinglip.errors import UnavailableError
    from bitinglip.gateway.handlers import EXCEPTION_HANDLERS

    async def failing(request: Any) -> Any:
        raise UnavailableError("the cluster refused the job: KilledWorker: ('run-1', <WorkerState "
                               "'tcp://10.1.2.3:40123', name: 0, status: closed>) after tcp://10.1.2.4:40999 left")

    app = Starlette(routes=[Route("/x", failing)], exception_handlers=EXCEPTION_HANDLERS)
    with caplog.at_level(logging.WARNING, logger="bitinglip.gateway.handlers"), TestClient(app) as client:
        r = client.get("/x")
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "10.1.2." not in message and "tcp://" not in message, message
    assert "a worker" in message
    # the detail stays in the gateway's log, with the request id
    assert any("tcp://10.1.2.3:40123" in rec.getMessage() and r.json()["error"]["request_id"] in rec.getMessage()
               for rec in caplog.records)


# --- 14.6: a submission does not wait for a busy worker

def test_submission_answered_while_workers_are_busy(gateway: str, models: dict[str, str]) -> None:
    h = auth(user())
    long_job = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=120,
                          json={"task": "generate", "model": "tiny-gpt2", "options": {"max_new_tokens": 32},
                                "inputs": [f"busy {i} go on" for i in range(5000)]})
    assert long_job.status_code == 202, long_job.text
    long_url = f"{gateway}/v1/jobs/{long_job.json()['id']}"
    try:
        wait_for(lambda: get_json(long_url, h), ("running",), timeout=120)
        started = time.monotonic()
        r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=120,
                       json={"task": "embed", "model": "tiny-encoder", "inputs": ["one row"]})
        submit_s = time.monotonic() - started
        assert r.status_code == 202, r.text
        started = time.monotonic()
        listed = httpx.get(f"{gateway}/v1/models", headers=h, timeout=120)
        models_s = time.monotonic() - started
        assert listed.status_code == 200, listed.text
        # the measurement means something only while the long job still holds the workers
        assert get_json(long_url, h)["state"] == "running"
        # issue 14.6 measured 41-44 s for the submission, 37 s for the model list
        assert submit_s < 5 and models_s < 5, (submit_s, models_s)

        async def crowd() -> tuple[list[int], float]:
            """45 submissions at once (one subject each: 10 a minute per subject), and a read among them."""
            async with httpx.AsyncClient(timeout=120) as client:
                posts = [asyncio.ensure_future(client.post(
                    f"{gateway}/v1/jobs", headers=auth(user()),
                    json={"task": "embed", "model": "tiny-encoder", "inputs": [f"crowd {i}"]})) for i in range(45)]
                await asyncio.sleep(0.2)
                started = time.monotonic()
                listed = await client.get(f"{gateway}/v1/models", headers=h)
                read_s = time.monotonic() - started
                assert listed.status_code == 200, listed.text
                return [r.status_code for r in await asyncio.gather(*posts)], read_s

        codes, read_s = asyncio.run(crowd())
        assert codes == [202] * 45
        assert read_s < 5, read_s  # reads do not wait behind submissions (37 s in the issue)
    finally:
        httpx.delete(long_url, headers=h, timeout=60)


# --- 13.6 and 14.6: model paths and names are resolved on the client

def test_relative_model_path_is_the_clients_folder(platform: Any, tiny_classifier: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    shutil.copytree(tiny_classifier, tmp_path / "my-classifier")
    monkeypatch.chdir(tmp_path)  # the workers keep the working directory they started in
    assert os.getcwd() not in platform.client.run(os.getcwd).values()
    job = platform.submit("classify", model="./my-classifier", inputs=["good", "bad"])
    assert job.spec.model == str(tmp_path / "my-classifier")  # the workers get the absolute path
    assert len(job.result(timeout=120)) == 2


def test_remote_cluster_resolves_on_a_worker(platform: Any, tiny_encoder: Path, tmp_path: Path) -> None:
    import shutil

    import bitinglip
    from bitinglip.errors import UnknownModelError

    # a model only the workers' cache holds: this client's cache is elsewhere
    shutil.copytree(tiny_encoder, platform.settings.model_cache_dir / "workers-only-encoder")
    settings = Settings(model_cache_dir=tmp_path / "client-cache")
    remote = bitinglip.connect(platform.client.scheduler.address, settings=settings)
    try:
        job = remote.submit("embed", model="workers-only-encoder", inputs=["a", "b"], gpu=False)
        assert len(job.result(timeout=120)) == 2
        with pytest.raises(UnknownModelError, match="unknown model 'no-such-model-anywhere'") as err:
            remote.submit("embed", model="no-such-model-anywhere", inputs=["a"], gpu=False)
        # raised here, not a worker's traceback carried over
        frames = [frame.filename for frame in traceback.extract_tb(err.value.__traceback__)]
        assert not any("distributed" in name for name in frames), frames
    finally:
        remote.close()


# --- 14.8: a client that trickles its body is answered 408 (or let go), not waited for

def test_slow_body_gets_408(gw_settings: Settings, models: dict[str, str]) -> None:
    from gwtools import serve

    from bitinglip.gateway.serve import server

    with serve(gw_settings.with_(body_timeout_s=2.0, keep_alive_s=2)) as url:
        host, port = url.removeprefix("http://").split(":")
        token = auth(user())["Authorization"]
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"task\": ".encode())
            started = time.monotonic()
            answer = b""
            while b"request_id" not in answer:  # and nothing more is sent
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer
        assert waited < 20, waited  # the bound is 2 s; before, the gateway waited for ever
    # the gateway's uvicorn gets the keep-alive and header-size settings
    import argparse

    srv = server(argparse.Namespace(host="127.0.0.1", port=0, scheduler=None, ssl_certfile=None, ssl_keyfile=None,
                                    log_level="warning", access_log=False),
                 gw_settings.with_(keep_alive_s=3, max_header_bytes=4096))
    assert srv.config.timeout_keep_alive == 3 and srv.config.h11_max_incomplete_event_size == 4096


def test_slow_request_head_is_cut_off(gw_settings: Settings, models: dict[str, str]) -> None:
    from gwtools import serve

    with serve(gw_settings.with_(header_timeout_s=2.0)) as url:
        host, port = url.removeprefix("http://").split(":")
        # one that sends a part of its headers, and one that sends nothing at all
        for opening in (f"GET /v1/jobs HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode(), b""):
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(opening)
                started = time.monotonic()
                assert sock.recv(65536) == b""  # the gateway hangs up
                assert time.monotonic() - started < 20  # the bound is 2 s; before, it waited for ever
        # a client that keeps its connection and sends requests in time is served throughout
        with httpx.Client(timeout=30) as client:
            h = auth(user())
            for _ in range(3):
                assert client.get(f"{url}/v1/jobs", headers=h).status_code == 200
                time.sleep(1.0)


# --- 13.13: a cancelled job's committed rows, and its resume over REST

def _all_rows(url: str, h: dict[str, str]) -> tuple[list[dict[str, Any]], list[httpx.Response]]:
    rows: list[dict[str, Any]] = []
    answers = []
    offset: int | None = 0
    while offset is not None:
        r = httpx.get(f"{url}/results?offset={offset}&limit=1000", headers=h, timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r)
        rows += r.json()["rows"]
        offset = r.json()["next_offset"]
    return rows, answers


#: rows per partition of the cancelled job: 40 partitions of its 1,000 rows, well over the 16 that the session's
#: two workers' engines take at once (ENGINE_PARTITIONS each). In the 8 partitions of 125 picked for two workers,
#: every partition ran in the same continuous batch and all could end on the same engine step: the cancel, sent
#: at the first commit, then found all 1,000 rows committed (a flake of a full run)
CANCEL_PARTITION_ROWS = 25


@pytest.fixture
def small_parts_gateway(gw_settings: Settings) -> Iterator[str]:
    from gwtools import serve

    with serve(gw_settings.with_(partition_rows=CANCEL_PARTITION_ROWS)) as url:
        yield url


def test_cancel_fetch_partial_resume_fetch_all(small_parts_gateway: str, gw_settings: Settings,
                                              models: dict[str, str], platform: Any) -> None:
    from bitinglip.gateway.routes.resume import settled

    h = auth(user())
    # 1,000 rows of 40 new tokens in 40 partitions: a worker's engine runs up to 8 of its partitions together
    # (continuous batching), so the first commit comes as those end, with more than half of the partitions not
    # started: the cancel at that commit lands mid-job however fast the engine steps
    texts = [f"row {i}" for i in range(1000)]
    r = httpx.post(f"{small_parts_gateway}/v1/jobs", headers=h, timeout=60,
                   json={"task": "generate", "model": "tiny-gpt2", "inputs": texts,
                         "options": {"max_new_tokens": 40}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    url = f"{small_parts_gateway}/v1/jobs/{job_id}"
    output = Path(gw_settings.results_dir) / job_id
    deadline = time.time() + 120
    while not list(output.glob("part-*.parquet")):  # cancel once some rows are committed
        assert time.time() < deadline, "no partition committed in 120 s"
        time.sleep(0.05)
    cancelled = httpx.delete(url, headers=h, timeout=60)
    assert cancelled.status_code == 202, cancelled.text
    # a partition at its last micro-batch may still commit: read once the stopped run has left the cluster
    assert settled(platform, job_id, 64)  # 64: more partitions than the job has

    partial, answers = _all_rows(url, h)
    assert all(a.headers["x-bitinglip-partial"] == "true" and a.json()["partial"] is True
               and a.json()["state"] == "cancelled" for a in answers)
    assert 0 < len(partial) < len(texts)
    files = get_json(f"{url}/results/files", h)
    assert files["partial"] is True and sum(f["rows"] for f in files["files"]) == len(partial)

    resumed = httpx.post(f"{url}/resume", headers=h, timeout=120)
    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["id"] == job_id and resumed.json()["state"] in ("queued", "running", "succeeded")
    again = httpx.post(f"{url}/resume", headers=h, timeout=120)
    if get_json(url, h)["state"] != "succeeded":
        assert again.status_code == 409, again.text  # a running job is not resumed twice
    assert httpx.post(f"{url}/resume", headers=auth(user()), timeout=60).status_code == 404  # owner only

    done = wait_for(lambda: get_json(url, h), timeout=300)
    assert done["state"] == "succeeded", done
    rows, answers = _all_rows(url, h)
    assert all(a.headers["x-bitinglip-partial"] == "false" and a.json()["partial"] is False for a in answers)
    assert sorted(row["id"] for row in rows) == list(range(len(texts)))  # every row exactly once
    assert len(list(output.glob("part-*.parquet"))) == len(texts) // CANCEL_PARTITION_ROWS
    by_id = {row["id"]: row for row in rows}
    assert all(by_id[row["id"]] == row for row in partial)  # committed rows were not run again
    assert httpx.post(f"{url}/resume", headers=h, timeout=60).status_code == 409  # succeeded: nothing to resume


# --- the new settings, and the idempotency key's layout

def test_new_settings_read_from_the_environment() -> None:
    from bitinglip.errors import ConfigError
    from bitinglip.settings import Rate

    s = Settings.from_env({"BITINGLIP_INFER_RATE_LIMIT": "50/second", "BITINGLIP_REDIS_MAX_CONNECTIONS": "400",
                           "BITINGLIP_REDIS_POOL_TIMEOUT": "2.5", "BITINGLIP_SUBMIT_THREADS": "4",
                           "BITINGLIP_BODY_TIMEOUT": "12", "BITINGLIP_HEADER_TIMEOUT": "3",
                           "BITINGLIP_KEEP_ALIVE": "7", "BITINGLIP_MAX_HEADER_BYTES": "8192"})
    assert s.infer_rate_limit == Rate(50, 1.0) and s.redis_max_connections == 400 and s.redis_pool_timeout_s == 2.5
    assert s.submit_threads == 4 and s.body_timeout_s == 12 and s.header_timeout_s == 3
    assert s.keep_alive_s == 7 and s.max_header_bytes == 8192
    assert Settings().infer_rate_limit == Rate(600, 60.0)
    for name, value in (("BITINGLIP_REDIS_POOL_TIMEOUT", "0"), ("BITINGLIP_SUBMIT_THREADS", "0"),
                        ("BITINGLIP_BODY_TIMEOUT", "soon"), ("BITINGLIP_INFER_RATE_LIMIT", "many")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})


def test_idempotency_keys_are_unambiguous() -> None:
    from bitinglip import redis_keys as keys

    assert keys.idempotency("a:b", "c") != keys.idempotency("a", "b:c")
    assert keys.idempotency("a", "b:c") != keys.idempotency("a:b:", "c")
