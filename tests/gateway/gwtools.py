"""Helpers for the gateway tests (and the reliability tests that stop gateways):
tokens, a gateway served in a thread or as its own process, polling."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from helpers import free_port

from bitinglip.settings import Settings

__all__ = ["free_port"]  # re-exported for the gateway tests


SECRET = "test-secret-that-is-long-enough-for-hs256!"


def new_user(prefix: str) -> str:
    """A token subject of its own, so that a test's jobs and rate limits are its alone."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def get_json(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """GET ``url``; it must answer 200."""
    r = httpx.get(url, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def make_token(sub: str, scopes: str = "jobs:read jobs:write", ttl: int = 600, key: str = SECRET,
               **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "scope": scopes, "iat": now, "exp": now + ttl, **claims}, key, algorithm="HS256")


def auth(sub: str, scopes: str = "jobs:read jobs:write") -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sub, scopes)}"}


@contextmanager
def serve(settings: Settings, ssl: tuple[str, str] | None = None, routes: list[Any] | None = None) -> Iterator[str]:
    """A gateway in a thread of this process, until the block ends; ``routes`` join the gateway's own."""
    import argparse

    from bitinglip.gateway.serve import server

    port = free_port()
    args = argparse.Namespace(host="127.0.0.1", port=port, scheduler=None, ssl_certfile=ssl and ssl[0],
                              ssl_keyfile=ssl and ssl[1], log_level="warning", access_log=False)
    srv = server(args, settings)
    srv.config.app.router.routes.extend(routes or [])
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        if not thread.is_alive() or time.time() > deadline:
            pytest.fail("the gateway did not start")
        time.sleep(0.05)
    try:
        yield f"{'https' if ssl else 'http'}://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)


def start_gateway(port: int, settings: Settings, scheduler: str, log: Path,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``bitinglip gateway`` as its own process (so a test can SIGKILL it),
    once it answers /health/live. ``env`` adds to its environment."""
    env = {**os.environ, "REDIS_URL": settings.redis_url or "", "BITINGLIP_JWT_SECRET": SECRET,
           "BITINGLIP_RESULTS_DIR": str(settings.results_dir), "MODEL_CACHE_DIR": str(settings.model_cache_dir),
           "ENVIRONMENT": "test", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "bitinglip", "gateway", "--port", str(port),
                             "--scheduler", scheduler, "--no-access-log"], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the gateway exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait(30)
    pytest.fail(f"the gateway did not start: {log.read_text()[-2000:]}")


def wait_for(get: Callable[[], dict[str, Any]], states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             timeout: float = 120, fail: bool = True) -> dict[str, Any]:
    """The job once its state is one of ``states``; at ``timeout``, a failure (or, ``fail=False``, the job as
    it is, for the caller to say more about it)."""
    deadline = time.time() + timeout
    while True:
        job = get()
        if job["state"] in states:
            return job
        if time.time() > deadline:
            if not fail:
                return job
            pytest.fail(f"job still {job['state']} after {timeout}s: {job}")
        time.sleep(0.2)
