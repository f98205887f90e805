"""Fast checks of the gateway's parts on a real Redis: job transitions, the
rate limiter, addresses behind proxies, tokens, settings."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
import redis.asyncio as aioredis
from gwtools import SECRET

from bitinglip.errors import ConfigError, RateLimitedError, UnauthorizedError
from bitinglip.gateway.auth import TokenVerifier, verifier
from bitinglip.gateway.ratelimit import RateLimiter, Verdict
from bitinglip.gateway.state import Gateway
from bitinglip.platform.jobs.jobstore import MISSING, MOVED, REFUSED, UPDATED, JobStore
from bitinglip.platform.jobs.vocabulary import STATES, TERMINAL, TRANSITIONS
from bitinglip.settings import Rate, Settings


async def _store(redis_url: str, ttl: int = 3600) -> tuple[Any, JobStore]:
    r = aioredis.from_url(redis_url, decode_responses=True)
    return r, JobStore(r, ttl)


def test_job_store_scripts_move_exactly_as_transitions_allow(redis_url: str) -> None:
    """The Lua scripts and the vocabulary's table agree on every pair of states."""
    async def body() -> None:
        r, store = await _store(redis_url)
        for cur in STATES:
            for new in STATES:
                job, now = uuid.uuid4().hex, time.time()
                assert await store.restore({"id": job, "state": cur, "owner": "parity", "created_at": now,
                                            "started_at": now, "finished_at": now})
                outcome = await store.transition(job, new)
                if new == cur:
                    assert outcome == (REFUSED if cur in TERMINAL else UPDATED), (cur, new, outcome)
                else:
                    assert outcome == (MOVED if new in TRANSITIONS[cur] else REFUSED), (cur, new, outcome)
                got = await store.get(job)
                assert got is not None and got["state"] == (new if outcome == MOVED else cur)
                expires = await r.ttl(f"bitinglip:v1:job:{job}") > 0
                assert expires == (got["state"] in TERMINAL), (cur, new)
        await r.aclose()

    anyio.run(body)


def test_job_transitions(redis_url: str) -> None:
    async def body() -> None:
        r, store = await _store(redis_url, ttl=120)
        job = uuid.uuid4().hex
        assert await store.transition(job, "running") == MISSING
        assert await store.create(job, "ann", {"task": "embed"}) == (job, True)
        assert await store.transition(job, None, {"rows_done": 3}) == UPDATED
        assert await store.transition(job, "running") == MOVED
        assert (await store.counts())["running"] >= 1
        assert await store.transition(job, "queued") == REFUSED  # no way back
        assert await store.transition(job, "succeeded") == MOVED
        assert await store.transition(job, "failed") == REFUSED  # finished is final
        assert await store.transition(job, None, {"rows_done": 9}) == REFUSED
        got = await store.get(job)
        assert got is not None and got["state"] == "succeeded" and got["rows_done"] == 3
        assert 0 < await r.ttl(f"bitinglip:v1:job:{job}") <= 120
        other = uuid.uuid4().hex
        await store.create(other, "ann", {})
        assert await r.ttl(f"bitinglip:v1:job:{other}") == -1  # unfinished jobs never expire
        jobs, total = await store.page("ann", 0, 10)
        assert [j["id"] for j in jobs] == [other, job] and total == 2
        await r.delete(f"bitinglip:v1:job:{other}")  # as if expired
        jobs, total = await store.page("ann", 0, 10)
        assert [j["id"] for j in jobs] == [job] and total == 1
        await r.aclose()

    anyio.run(body)


def test_idempotent_create(redis_url: str) -> None:
    async def body() -> None:
        r, store = await _store(redis_url)
        owner = uuid.uuid4().hex
        a, b = uuid.uuid4().hex, uuid.uuid4().hex
        assert await store.create(a, owner, {}, "k1") == (a, True)
        assert await store.create(b, owner, {}, "k1") == (a, False)
        assert await store.get(b) is None
        assert await store.create(b, "someone-else", {}, "k1") == (b, True)
        await r.aclose()

    anyio.run(body)


def test_a_submission_abandoned_before_the_cluster_took_it_fails(redis_url: str, platform: Any,
                                                                  tiny_encoder: Path, tmp_path: Path) -> None:
    """A gateway that dies between recording a job and handing it to the
    cluster leaves it queued for ever; another gateway's sweep fails it,
    and leaves alone the jobs that were handed over or are still young."""
    from bitinglip.gateway.rebuild import ABANDONED_ERROR, ABANDONED_S, sweep_abandoned

    async def body() -> None:
        r, store = await _store(redis_url)
        owner = uuid.uuid4().hex
        old = time.time() - ABANDONED_S - 10
        lost, handed, held, young = (uuid.uuid4().hex for _ in range(4))
        for job_id in (lost, handed, held):
            await store.create(job_id, owner, {"task": "embed"}, now=old)
        await store.create(young, owner, {"task": "embed"})
        await store.transition(handed, None, {"parts": 3})
        # the cluster holds this one, but its gateway died before recording the parts
        job = await anyio.to_thread.run_sync(lambda: platform.submit(
            "embed", model=str(tiny_encoder), inputs=["one row"], output=tmp_path / "out", job_id=held))
        await anyio.to_thread.run_sync(job.wait)
        failed = await sweep_abandoned(store, platform)
        assert lost in failed and not {handed, held, young} & set(failed)
        got = await store.get(lost)
        assert got is not None and got["state"] == "failed" and got["error"] == ABANDONED_ERROR
        assert [(await store.get(j) or {}).get("state") for j in (handed, held, young)] == ["queued"] * 3
        assert lost not in await sweep_abandoned(store, platform)  # once
        await r.aclose()

    anyio.run(body)


def test_sliding_rate_limit(redis_url: str) -> None:
    async def body() -> None:
        r = aioredis.from_url(redis_url, decode_responses=True)
        limiter = RateLimiter(r, {"write": Rate(3, 60.0)})
        who = uuid.uuid4().hex
        remaining = [(await limiter.hit("write", who)).remaining for _ in range(3)]
        assert remaining == [2, 1, 0]
        with pytest.raises(RateLimitedError) as info:
            await limiter.hit("write", who)
        assert 1 <= info.value.retry_after <= 60 and info.value.headers["Retry-After"]
        assert (await limiter.hit("write", uuid.uuid4().hex)).remaining == 2
        await r.aclose()

    anyio.run(body)


def test_rate_limit_refund_and_two_gateways(redis_url: str) -> None:
    """Two limiters on their own connections share one limit; a refund gives
    back exactly one slot (it reaches into the limits package's Redis layout:
    this fails if an upgrade changes it)."""
    async def body() -> None:
        r1, r2 = aioredis.from_url(redis_url, decode_responses=True), aioredis.from_url(redis_url)
        one, two = RateLimiter(r1, {"write": Rate(3, 60.0)}), RateLimiter(r2, {"write": Rate(3, 60.0)})
        who = f"a/b:{uuid.uuid4().hex}"
        verdicts = [await one.hit("write", who), await two.hit("write", who), await one.hit("write", who)]
        assert [v.remaining for v in verdicts] == [2, 1, 0]
        assert await r1.type(f"bitinglip:v1:rate:write/{who}/3/60/second") == "list"
        with pytest.raises(RateLimitedError):
            await two.hit("write", who)
        await two.refund(verdicts[1])
        assert (await one.hit("write", who)).remaining == 0
        with pytest.raises(RateLimitedError) as info:
            await one.hit("write", who)
        assert info.value.headers["X-RateLimit-Remaining"] == "0"
        await one.refund(Verdict(3, 0, 60, "write", who))  # nothing counted: nothing given back
        with pytest.raises(RateLimitedError):
            await two.hit("write", who)
        await r1.aclose()
        await r2.aclose()

    anyio.run(body)


def test_rate_limit_without_redis_is_redis_s_own_error() -> None:
    """The gateway answers 503 for Redis' connection errors: the limiter must
    not wrap them in errors of its own."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def body() -> None:
        r = aioredis.from_url("redis://127.0.0.1:1/0")
        with pytest.raises(RedisConnectionError):
            await RateLimiter(r, {"read": Rate(3, 60.0)}).hit("read", "someone")
        await r.aclose()

    anyio.run(body)


def test_client_address_behind_proxies() -> None:
    """The app's proxy headers middleware: X-Forwarded-For counts only from a
    trusted proxy, and then its rightmost hop that is not a proxy is the caller."""
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from bitinglip.gateway.app import create_app

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", jwt_secret=SECRET,
                              trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),)))
    app.router.routes.append(Route("/caller", lambda request: PlainTextResponse(request.client.host)))

    def caller(peer: str, xff: str | None = None) -> str:
        client = TestClient(app, client=(peer, 1234))  # no lifespan: nothing connects
        return client.get("/caller", headers={"X-Forwarded-For": xff} if xff else {}).text

    assert caller("192.0.2.1", "198.51.100.1") == "192.0.2.1"  # not a proxy
    assert caller("10.0.0.5", "198.51.100.1") == "198.51.100.1"
    assert caller("10.0.0.5", "6.6.6.6, 198.51.100.1, 10.0.0.7") == "198.51.100.1"
    assert caller("10.0.0.5", "garbage") == "garbage"  # not the proxy's own address, which may be allowlisted
    assert caller("10.0.0.5") == "10.0.0.5"


def test_verifier_rules() -> None:
    v = TokenVerifier(SECRET, "HS256", issuer="bitinglip", audience="api")
    good = jwt.encode({"sub": "a", "exp": 2**31, "scope": ["jobs:read"], "iss": "bitinglip", "aud": "api"}, SECRET)
    assert v.decode(f"Bearer {good}").scopes == {"jobs:read"}
    wrong_iss = jwt.encode({"sub": "a", "exp": 2**31, "iss": "other", "aud": "api"}, SECRET)
    with pytest.raises(UnauthorizedError):
        v.decode(f"Bearer {wrong_iss}")
    with pytest.raises(UnauthorizedError):
        v.decode("Basic abc")


def test_production_needs_a_key(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="BITINGLIP_JWT_SECRET"):
        Gateway(Settings(environment="production", redis_url=redis_url))
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Gateway(Settings(jwt_secret=SECRET))
    assert verifier(Settings(environment="production", jwt_secret=SECRET))[1] is False


def test_settings_from_env() -> None:
    s = Settings.from_env({"BITINGLIP_RATE_LIMIT": "5/second", "BITINGLIP_ADMIN_ALLOWLIST": "10.0.0.0/8,::1",
                           "BITINGLIP_MAX_BODY_BYTES": "1000"})
    assert s.rate_limit == Rate(5, 1.0) and s.read_rate_limit == Rate(600, 60.0) and s.max_body_bytes == 1000
    assert ipaddress.ip_address("10.1.2.3") in s.admin_allowlist[0]
    for name, value in (("BITINGLIP_RATE_LIMIT", "ten/minute"), ("BITINGLIP_RATE_LIMIT", "5/fortnight"),
                        ("BITINGLIP_ADMIN_ALLOWLIST", "10.0.0.0/33"), ("BITINGLIP_MAX_BODY_BYTES", "0")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})


def test_token_command_prints_only_the_token() -> None:
    env = {**os.environ, "BITINGLIP_JWT_SECRET": SECRET}
    out = subprocess.run([sys.executable, "-m", "bitinglip", "token", "--sub", "alice", "--scope", "jobs:write"],
                         capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    claims = jwt.decode(out.strip(), SECRET, algorithms=["HS256"])
    assert out.count("\n") == 1 and claims["sub"] == "alice" and claims["scope"] == "jobs:write"
    bad = subprocess.run([sys.executable, "-m", "bitinglip", "token", "--sub", "a", "--scope", "root"],
                         check=False, capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and bad.stdout == ""
