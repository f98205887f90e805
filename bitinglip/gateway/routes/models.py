"""Models over REST: the names a caller may use, and their registration.

``GET /v1/models`` answers in OpenAI's list shape (``client.models.list()``);
``GET /v1/models?format=bitinglip`` keeps BitingLip's own listing (source,
version, task, sha256, ...).  ``GET /v1/models/{name}`` carries both.

A REST caller names models only from the model registry (issue 3's
``MODEL_CACHE_DIR/name/version`` with sha256 manifests) or the models that
ship in Python packages, never by path.  Admins add and remove registry
versions here; the registry is a directory that gateways and workers share.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from bitinglip.errors import InputError, NotFoundError, UnknownModelError
from bitinglip.gateway.body import read_json
from bitinglip.gateway.ratelimit import WRITE
from bitinglip.gateway.schemas import ModelRegistration, parse
from bitinglip.gateway.state import Gateway
from bitinglip.platform.models import Registry, catalogue


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "version", "task", "dtype", "revision", "size_bytes", "sha256", "added_at", "source_kind")
    return {"source": entry.get("source_kind"), **{k: entry[k] for k in keep if k in entry and k != "source_kind"}}


def _openai(entry: dict[str, Any]) -> dict[str, Any]:
    """A model as OpenAI's ``Model`` object."""
    added = entry.get("added_at")  # an ISO time for registered models; packaged ones have none
    created = int(datetime.fromisoformat(added).timestamp()) if isinstance(added, str) and added else 0
    return {"id": entry["name"], "object": "model", "created": created,
            "owned_by": "bitinglip" if entry.get("source_kind") == "registered" else str(entry.get("source_kind"))}


async def list_models(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "jobs:read")
    shape = request.query_params.get("format", "openai")
    if shape not in ("openai", "bitinglip"):
        raise InputError("format must be openai (the default) or bitinglip")
    entries = list((await anyio.to_thread.run_sync(catalogue, gw.settings)).values())
    if shape == "bitinglip":
        models = [_public(e) for e in entries]
        return gw.json(request, {"models": models, "count": len(models)})
    return gw.json(request, {"object": "list", "data": [_openai(e) for e in entries]})


async def get_model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "jobs:read")
    entry = (await anyio.to_thread.run_sync(catalogue, gw.settings)).get(request.path_params["name"])
    if entry is None:
        raise NotFoundError(f"no model {request.path_params['name']!r}")
    return gw.json(request, {**_openai(entry), **_public(entry)})


async def admin_list_models(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "admin")
    models = [m.summary() for m in await anyio.to_thread.run_sync(Registry(gw.settings).list)]
    return gw.json(request, {"models": models, "count": len(models)})


async def admin_register_model(request: Request) -> Response:
    """Add a version to the registry: ``{"name", "source", "task", "dtype"?,
    "max_length"?, "pooling"?}``; ``source`` is a directory or a ``.gguf`` file
    (dequantized once) the gateway can read, ``hf://org/name@commit`` or ``pkg://distribution``."""
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "admin", WRITE)
    body = parse(ModelRegistration, await read_json(request))
    kwargs = body.model_dump(include={"dtype", "max_length", "pooling"}, exclude_unset=True)

    def add() -> dict[str, Any]:
        registry = Registry(gw.settings)
        return registry.add(body.name, body.source, task=body.task, actor=principal.sub, **kwargs).summary()

    return gw.json(request, await anyio.to_thread.run_sync(add), 201)


async def admin_remove_model(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "admin", WRITE)
    ref = request.path_params["name"]
    try:
        await anyio.to_thread.run_sync(lambda: Registry(gw.settings).remove(ref, actor=principal.sub))
    except UnknownModelError as exc:
        raise NotFoundError(str(exc)) from None
    return Response(status_code=204, headers=getattr(request.state, "ratelimit", {}))
