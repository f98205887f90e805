"""Issue 26's gateway limits and hygiene, on the live gateway, Redis and Dask
cluster: work that ran counts against the rate limit (M1), the upload quota
and file expiry (M2, ``output_expires_after``), multipart framing and
filenames (L4), SIGTERM (L5) and the longest token lifetime (L6)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis
import redis.asyncio
from gwtools import SECRET, auth, free_port, make_token, new_user, serve, start_gateway

from bitinglip import redis_keys as keys
from bitinglip.gateway.openai.files import FileStore
from bitinglip.settings import Rate, Settings

openai = pytest.importorskip("openai", reason="the official openai client is not installed (the dev extra pins it)")

LINE = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": "tiny-encoder", "input": "hello"}}) + "\n"


def user() -> str:
    return new_user("limits")


def client(gateway: str, sub: str) -> Any:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=make_token(sub), max_retries=0, timeout=120)


def tasks_run(platform: Any) -> int:
    """Tasks the scheduler has seen finish or fail, ever."""
    def count(dask_scheduler: Any) -> int:
        return sum(tp.state_counts["memory"] + tp.state_counts["erred"]
                   for tp in dask_scheduler.task_prefixes.values())
    return int(platform.client.run_on_scheduler(count))


@pytest.fixture(scope="module")
def limited(gw_settings: Settings, models: dict[str, str]) -> Iterator[str]:
    """A gateway of 5 online requests a minute and 3000 bytes of files per subject."""
    with serve(gw_settings.with_(infer_rate_limit=Rate(5, 60.0), files_max_bytes_per_tenant=3000)) as url:
        yield url


# --- M1: work that ran counts; a bad `dimensions` runs nothing

def test_embeddings_past_the_models_dimensions_run_nothing(limited: str, platform: Any) -> None:
    oai = client(limited, user())
    before = tasks_run(platform)
    for _ in range(8):  # over the limit of 5: each is refused before the cluster sees it, so none counts
        with pytest.raises(openai.BadRequestError) as err:
            oai.embeddings.create(model="tiny-encoder", input=["x" * 1000] * 16, dimensions=1000)
        assert err.value.body["param"] == "dimensions" and "the model's 32" in err.value.body["message"]
    assert tasks_run(platform) == before
    assert len(oai.embeddings.create(model="tiny-encoder", input="x", dimensions=8).data[0].embedding) == 8


def test_a_request_whose_work_ran_counts_though_it_fails(limited: str) -> None:
    h = auth(user())
    got = []
    for _ in range(6):  # the worker refuses a chat for tiny-gpt2, which has no chat template, after loading it
        r = httpx.post(f"{limited}/v1/chat/completions", headers=h, timeout=120,
                       json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        got.append(r.status_code)
        if r.status_code != 429:
            assert "chat template" in r.text, r.text  # refused by the worker, after the work was dispatched
    assert got[:5] != [429] * 5 and all(400 <= s < 500 and s != 429 for s in got[:5]), got
    assert got[5] == 429, got


# --- M2: a quota per subject, files that expire

def upload(gateway: str, h: dict[str, str], data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(f"{gateway}/v1/files", headers=h, timeout=60, data={"purpose": "batch", **fields},
                      files={"file": ("batch.jsonl", data)})


def test_uploads_past_the_quota_are_refused_until_files_go(limited: str) -> None:
    sub = user()
    oai = client(limited, sub)
    first = oai.files.create(file=("a.jsonl", LINE.encode() * 20), purpose="batch")  # 20 x ~100 bytes
    with pytest.raises(openai.APIStatusError) as err:
        oai.files.create(file=("b.jsonl", LINE.encode() * 20), purpose="batch")
    assert err.value.status_code == 413 and err.value.body["code"] == "quota_exceeded"
    assert "BITINGLIP_FILES_MAX_BYTES_PER_TENANT" in err.value.body["message"]
    assert [f.id for f in oai.files.list()] == [first.id]  # the refused one left nothing behind
    client(limited, user()).files.create(file=("c.jsonl", LINE.encode() * 20), purpose="batch")  # others' own quota
    oai.files.delete(first.id)
    oai.files.create(file=("b.jsonl", LINE.encode() * 20), purpose="batch")


def test_expires_after_is_openais_and_expired_files_go(limited: str, gw_settings: Settings) -> None:
    sub = user()
    oai = client(limited, sub)
    made = oai.files.create(file=("a.jsonl", LINE.encode() * 20), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert made.expires_at == made.created_at + 3600
    default = oai.files.create(file=("b.jsonl", LINE.encode()), purpose="batch")
    assert default.expires_at == default.created_at + 30 * 86400  # OpenAI's default for batch files
    for bad in ({"anchor": "created_at", "seconds": 60}, {"anchor": "last_active_at", "seconds": 3600},
                {"anchor": "created_at", "seconds": 10**9}):
        with pytest.raises(openai.BadRequestError) as err:
            oai.files.create(file=("c.jsonl", LINE.encode()), purpose="batch", expires_after=bad)
        assert err.value.body["param"] == "expires_after", err.value.body
    r = redis.Redis.from_url(gw_settings.redis_url or "", decode_responses=True)
    used = int(r.get(keys.openai_file_bytes(sub)) or 0)
    # an hour later, as far as the record says: a read deletes it, and frees its bytes
    r.hset(keys.openai_file(made.id), "expires_at", int(time.time()) - 1)
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(made.id)
    assert int(r.get(keys.openai_file_bytes(sub)) or 0) == used - made.bytes
    assert not (gw_settings.results_dir / "_openai_files" / f"{made.id}.jsonl").exists()
    assert [f.id for f in oai.files.list()] == [default.id]
    # the sweep deletes what nobody reads
    files = FileStore(redis.asyncio.Redis.from_url(gw_settings.redis_url or "", decode_responses=True),
                      gw_settings.results_dir)
    assert asyncio.run(files.sweep(now=time.time() + 31 * 86400)) >= 1
    assert oai.files.list().data == [] and int(r.get(keys.openai_file_bytes(sub)) or 0) == 0


def test_output_expires_after_gives_the_batch_files_an_expiry(gateway: str, models: dict[str, str]) -> None:
    oai = client(gateway, user())
    source = oai.files.create(file=("in.jsonl", LINE.encode()), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        oai.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h",
                           output_expires_after={"anchor": "created_at", "seconds": 5})
    assert "output_expires_after" in err.value.body["message"]
    batch = oai.batches.create(input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h",
                               output_expires_after={"anchor": "created_at", "seconds": 7200})
    deadline = time.time() + 300
    while batch.status not in ("completed", "failed", "cancelled"):
        assert time.time() < deadline, batch
        time.sleep(0.3)
        batch = oai.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.output_file_id
    output = oai.files.retrieve(batch.output_file_id)
    assert output.expires_at is not None and abs(output.expires_at - (output.created_at + 7200)) <= 1


# --- L4: multipart framing and filenames

def raw_upload(gateway: str, body: bytes, boundary: str = "xyz") -> httpx.Response:
    return httpx.post(f"{gateway}/v1/files", headers={**auth(user()),
                                                      "content-type": f"multipart/form-data; boundary={boundary}"},
                      content=body, timeout=60)


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    extra = f'; filename="{filename}"' if filename is not None else ""
    return f'--xyz\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode() + value + b"\r\n"


def test_a_cut_off_multipart_body_is_refused(gateway: str) -> None:
    whole = part("purpose", b"batch") + part("file", LINE.encode() * 3, "a.jsonl") + b"--xyz--\r\n"
    assert raw_upload(gateway, whole).status_code == 200
    cut = part("purpose", b"batch") + b'--xyz\r\nContent-Disposition: form-data; name="file"; ' \
        b'filename="a.jsonl"\r\n\r\n' + LINE.encode() * 2 + LINE.encode()[:10]
    r = raw_upload(gateway, cut)
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]["message"], r.text


def test_two_file_parts_are_refused(gateway: str) -> None:
    body = part("purpose", b"batch") + part("file", LINE.encode(), "a.jsonl") + \
        part("file", LINE.encode(), "b.jsonl") + b"--xyz--\r\n"
    r = raw_upload(gateway, body)
    assert r.status_code == 400 and "more than one 'file' part" in r.json()["error"]["message"], r.text
    twice = part("purpose", b"batch") + part("purpose", b"batch") + part("file", LINE.encode(), "a.jsonl") + \
        b"--xyz--\r\n"
    assert raw_upload(gateway, twice).status_code == 400
    many = part("purpose", b"batch") + b"".join(part(f"f{i}", b"x") for i in range(20)) + \
        part("file", LINE.encode(), "a.jsonl") + b"--xyz--\r\n"
    r = raw_upload(gateway, many)
    assert r.status_code == 400 and "form fields" in r.json()["error"]["message"], r.text


def test_a_filename_keeps_only_its_last_segment(gateway: str) -> None:
    h = auth(user())
    for sent in ("../../etc/passwd", "..\\..\\boot.ini", "/abs/x.jsonl", ".."):
        r = httpx.post(f"{gateway}/v1/files", headers=h, timeout=60, data={"purpose": "batch"},
                       files={"file": (sent, LINE.encode())})
        assert r.status_code == 200, r.text
        name = r.json()["filename"]
        assert "/" not in name and "\\" not in name and name not in ("..", "."), name
        content = httpx.get(f"{gateway}/v1/files/{r.json()['id']}/content", headers=h, timeout=60)
        assert ".." not in content.headers["content-disposition"], content.headers
    assert r.json()["filename"] == "upload.jsonl"


# --- L5: SIGTERM with a request still waiting on the cluster

def test_the_gateway_exits_on_sigterm_with_a_request_in_flight(gw_settings: Settings, tmp_path: Path) -> None:
    from distributed import LocalCluster

    # a scheduler with no workers: an online request waits on it for ever
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        port = free_port()
        proc = start_gateway(port, gw_settings, cluster.scheduler_address, tmp_path / "gateway.log")
        try:
            with pytest.raises(httpx.TimeoutException):  # the caller gives up and closes its connection
                httpx.post(f"http://127.0.0.1:{port}/v1/infer", headers=auth(user()), timeout=2,
                           json={"task": "embed", "model": "all-MiniLM-L6-v2", "inputs": ["a"]})
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)  # a generous bound: the gateway gives requests 5 s, then cancels them
            assert time.monotonic() - start < 30
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    with socket.socket() as s:  # and it let go of its port
        s.bind(("127.0.0.1", port))


# --- L6: the longest token lifetime

def test_a_token_living_longer_than_the_max_ttl_is_refused(gateway: str) -> None:
    now = int(time.time())
    for token in (jwt.encode({"sub": user(), "scope": "jobs:read", "exp": now + 10**12}, SECRET),  # no iat
                  make_token(user(), ttl=31 * 86400)):
        r = httpx.get(f"{gateway}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 401 and "BITINGLIP_JWT_MAX_TTL" in r.json()["error"]["message"], r.text
    ok = make_token(user(), ttl=29 * 86400)
    assert httpx.get(f"{gateway}/v1/jobs", headers={"Authorization": f"Bearer {ok}"}, timeout=30).status_code == 200


def test_bitinglip_token_refuses_a_lifetime_past_the_max() -> None:
    env = {**os.environ, "BITINGLIP_JWT_SECRET": SECRET, "BITINGLIP_JWT_MAX_TTL": "86400"}
    run = [sys.executable, "-m", "bitinglip", "token", "--sub", "me", "--scope", "jobs:read"]
    long = subprocess.run([*run, "--ttl", str(10**12)], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert long.returncode == 2 and "BITINGLIP_JWT_MAX_TTL" in long.stderr, long.stderr
    short = subprocess.run([*run, "--ttl", "3600"], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert short.returncode == 0 and short.stdout.count(".") == 2, short.stderr
