"""Models over REST: the names a caller may use, and their registration.

A REST caller names models only from this list, never by path: the models
that ship in Python packages, the directories under ``MODEL_CACHE_DIR``,
and the models an admin registered (a name for a directory the workers
can read, kept in Redis so every gateway sees it).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from bitinglip.gateway.body import read_json
from bitinglip.gateway.ratelimit import WRITE
from bitinglip.gateway.state import Gateway
from bitinglip.platform import keys
from bitinglip.platform.errors import InputError, NotFoundError, UnavailableError, UnknownModelError
from bitinglip.platform.models import PACKAGED_MODELS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CHECK_TIMEOUT_S = 30


def _cached(gw: Gateway) -> dict[str, dict[str, Any]]:
    root = gw.settings.model_cache_dir
    try:
        entries = sorted(root.iterdir()) if root.is_dir() else []
    except OSError:
        return {}
    return {p.name: {"name": p.name, "source": "cache"} for p in entries if (p / "config.json").is_file()}


async def registry(gw: Gateway) -> dict[str, dict[str, Any]]:
    """Every usable model by name; registered names win over the others."""
    found: dict[str, dict[str, Any]] = {name: {"name": name, "source": "package"} for name in PACKAGED_MODELS}
    found.update(_cached(gw))
    for name, raw in (await gw.redis.hgetall(keys.models())).items():
        found[name] = {**json.loads(raw), "source": "registered"}
    return found


async def resolve(gw: Gateway, name: Any) -> str:
    """What to hand the cluster for model ``name``: a registered model's
    directory, else the name itself. Unknown names are refused."""
    if not isinstance(name, str) or not name:
        raise InputError("model must be a non-empty string")
    entry = (await registry(gw)).get(name)
    if entry is None:
        raise UnknownModelError(f"unknown model {name!r}; GET /v1/models lists the models you can use")
    return str(entry.get("path") or name)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("name", "source", "task", "registered_at") if k in entry}


async def list_models(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "jobs:read")
    models = [_public(e) for e in (await registry(gw)).values()]
    return gw.json(request, {"models": models, "count": len(models)})


async def get_model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "jobs:read")
    entry = (await registry(gw)).get(request.path_params["name"])
    if entry is None:
        raise NotFoundError(f"no model {request.path_params['name']!r}")
    return gw.json(request, _public(entry))


def _is_model_dir(path: str) -> bool:
    """Runs on a worker: is ``path`` a model directory there?"""
    from pathlib import Path

    return (Path(path) / "config.json").is_file()


async def admin_list_models(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "admin")
    models = list((await registry(gw)).values())
    return gw.json(request, {"models": models, "count": len(models)})


async def admin_register_model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "admin", WRITE)
    body = await read_json(request)
    name, path, task = body.get("name"), body.get("path"), body.get("task")
    unknown = sorted(set(body) - {"name", "path", "task"})
    if unknown:
        raise InputError(f"unknown field {', '.join(unknown)}")
    if not isinstance(name, str) or not NAME.match(name):
        raise InputError("name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 1000 or "\x00" in path:
        raise InputError("path must be an absolute directory path on the workers")
    if task is not None and task not in ("embed", "classify", "generate"):
        raise InputError("task, when given, must be embed, classify or generate")
    client = gw.platform.client
    future = client.submit(_is_model_dir, path, pure=False)
    try:
        with anyio.fail_after(CHECK_TIMEOUT_S):
            ok = await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
    except TimeoutError:
        raise UnavailableError("no worker answered the model check in time") from None
    if not ok:
        raise InputError(f"{path!r} is not a model directory (no config.json) on the workers")
    record = {"name": name, "path": path, "task": task, "registered_by": principal.sub,
              "registered_at": time.time()}
    created = await gw.redis.hset(keys.models(), name, json.dumps({k: v for k, v in record.items() if v is not None}))
    return gw.json(request, record, 201 if created else 200)


async def admin_remove_model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "admin", WRITE)
    if not await gw.redis.hdel(keys.models(), request.path_params["name"]):
        raise NotFoundError(f"no registered model {request.path_params['name']!r}")
    return Response(status_code=204, headers=getattr(request.state, "ratelimit", {}))
