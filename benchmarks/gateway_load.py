"""Load test of the gateway on loopback: ``GET /v1/jobs/{id}`` and ``POST /v1/infer``.

Starts everything it needs (a redis-server, an embedded Dask cluster, a
``bitinglip gateway`` process), then drives each route with N concurrent
HTTP/1.1 keep-alive clients for a fixed time and prints requests per second
and p50/p99 latency.  The load generator shares the machine with the
gateway and the workers, so on a small machine the figures are a floor.

    python benchmarks/gateway_load.py --duration 15 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jwt

SECRET = "benchmark-secret-benchmark-secret-benchmark"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


async def drive(url: str, method: str, body: Any, headers: dict[str, str], duration: float,
                concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[int, int] = {}
    stop = time.perf_counter() + duration

    async def client() -> None:
        async with httpx.AsyncClient(headers=headers, timeout=60) as http:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                r = await http.request(method, url, json=body)
                latencies.append(time.perf_counter() - started)
                if r.status_code >= 300:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {"requests": len(latencies), "rps": round(len(latencies) / elapsed, 1), "p50_ms": round(pct(0.50), 1),
            "p99_ms": round(pct(0.99), 1), "errors": errors}


@contextmanager
def gateway_stack(workers: int, env: dict[str, str] | None = None) -> Iterator[tuple[Any, str, str]]:
    """A Redis, an embedded cluster of ``workers`` and a gateway process on
    it (``env``: more of its settings): yields the platform, the gateway's
    base URL and a token with jobs:read and jobs:write; all gone after."""
    import bitinglip
    from bitinglip.settings import Settings

    tmp = tempfile.mkdtemp(prefix="bitinglip-bench-")
    redis_port, port = free_port(), free_port()
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
                             stdout=subprocess.DEVNULL)
    platform = bitinglip.connect(settings=Settings(), n_workers=workers, dashboard_address=":0")
    gateway_env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "BITINGLIP_JWT_SECRET": SECRET,
                   "BITINGLIP_RESULTS_DIR": os.path.join(tmp, "results"), **(env or {})}
    gateway = subprocess.Popen([sys.executable, "-m", "bitinglip", "gateway", "--port", str(port), "--scheduler",
                                platform.client.scheduler.address, "--no-access-log", "--log-level", "warning"],
                               env=gateway_env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health/live", gateway)
        token = jwt.encode({"sub": "bench", "scope": "jobs:read jobs:write", "exp": int(time.time()) + 3600}, SECRET)
        yield platform, base, token
    finally:
        gateway.terminate()
        gateway.wait(30)
        platform.close()
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per route")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=1, help="Dask workers")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    args = parser.parse_args()

    with gateway_stack(args.workers, {"BITINGLIP_RATE_LIMIT": "1000000/minute",
                                      "BITINGLIP_READ_RATE_LIMIT": "1000000/minute"}) as (_, base, token):
        headers = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base}/v1/jobs", headers=headers, timeout=120,
                       json={"task": "embed", "model": args.model, "inputs": ["warm up the model"] * 8})
        r.raise_for_status()
        job_id = r.json()["id"]
        while httpx.get(f"{base}/v1/jobs/{job_id}", headers=headers).json()["state"] not in ("succeeded", "failed"):
            time.sleep(0.2)
        infer_body = {"task": "embed", "model": args.model, "inputs": ["how fast is a single sentence?"]}
        httpx.post(f"{base}/v1/infer", headers=headers, json=infer_body, timeout=120).raise_for_status()
        results = {
            "GET /v1/jobs/{id}": asyncio.run(drive(f"{base}/v1/jobs/{job_id}", "GET", None, headers,
                                                   args.duration, args.concurrency)),
            "POST /v1/infer": asyncio.run(drive(f"{base}/v1/infer", "POST", infer_body, headers,
                                                args.duration, args.concurrency)),
        }
        print(f"{'route':<22} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  errors")
        for route, res in results.items():
            print(f"{route:<22} {res['requests']:>9} {res['rps']:>8} {res['p50_ms']:>8} {res['p99_ms']:>8}  "
                  f"{res['errors'] or '-'}")
        print(json.dumps({"concurrency": args.concurrency, "duration_s": args.duration, "cpus": os.cpu_count(),
                          "results": results}))


if __name__ == "__main__":
    main()
