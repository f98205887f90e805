"""Health: one entry per component, 503 when one is down; liveness and
readiness for orchestrators.  These routes need no token."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bitinglip import __version__
from bitinglip.gateway.handlers import scrub
from bitinglip.gateway.state import Gateway
from bitinglip.platform.models import catalogue

CHECK_TIMEOUT_S = 5.0


async def _models(gw: Gateway) -> dict[str, Any]:
    root = gw.settings.model_cache_dir
    readable = root.is_dir() and os.access(root, os.R_OK | os.X_OK)
    entry: dict[str, Any] = {"status": "ok" if readable else "down", "cache_dir": str(root),
                             "cache_dir_readable": readable}
    try:
        with anyio.fail_after(CHECK_TIMEOUT_S):
            entry["registry_size"] = len(await anyio.to_thread.run_sync(catalogue, gw.settings))
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        entry.update(status="down", error=scrub(f"registry: {type(exc).__name__}: {exc}"))
    return entry


async def _tasks(gw: Gateway) -> dict[str, Any]:
    try:
        with anyio.fail_after(CHECK_TIMEOUT_S):
            await gw.redis.ping()
            counts = await gw.store.counts()
    except Exception as exc:  # noqa: BLE001
        return {"status": "down", "redis": "unreachable", "error": scrub(f"{type(exc).__name__}: {exc}")}
    return {"status": "ok", "redis": "reachable", "queued": counts["queued"], "running": counts["running"]}


def _cluster_info(client: Any) -> dict[str, Any]:
    info = client.scheduler_info(n_workers=-1)
    workers = info.get("workers", {})
    gpus = sum((w.get("resources") or {}).get("GPU", 0) for w in workers.values())
    return {"scheduler": info.get("address"), "workers": len(workers), "gpus": int(gpus)}


async def _cluster(gw: Gateway) -> dict[str, Any]:
    client = getattr(gw.platform, "client", None)
    if client is None or client.status != "running":
        return {"status": "down", "scheduler": "unreachable"}
    try:
        with anyio.fail_after(CHECK_TIMEOUT_S):
            info = await anyio.to_thread.run_sync(_cluster_info, client, abandon_on_cancel=True)
    except Exception as exc:  # noqa: BLE001
        return {"status": "down", "scheduler": "unreachable", "error": scrub(f"{type(exc).__name__}: {exc}")}
    return {"status": "ok" if info["workers"] else "down", **info}


async def health(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    started = time.perf_counter()
    components = {"gateway": {"status": "ok", "version": __version__, "tls": gw.tls}}
    components["models"], components["tasks"], components["cluster"] = (
        await _models(gw), await _tasks(gw), await _cluster(gw))
    down = [name for name, c in components.items() if c["status"] != "ok"]
    body = {"status": "down" if down else "ok", "down": down, "components": components,
            "checked_in_s": round(time.perf_counter() - started, 4)}
    return JSONResponse(body, status_code=503 if down else 200)


async def live(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    tasks, cluster = await _tasks(gw), await _cluster(gw)
    ok = tasks["status"] == "ok" and cluster["status"] == "ok"
    return JSONResponse({"status": "ok" if ok else "down", "tasks": tasks["status"], "cluster": cluster["status"]},
                        status_code=200 if ok else 503)
