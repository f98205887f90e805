"""OpenAI's Files: upload a batch file, list, read, download, delete.

An upload streams to ``BITINGLIP_RESULTS_DIR`` as it arrives
(:func:`bitinglip.gateway.openai.files.receive`), bounded by
``BITINGLIP_BATCH_MAX_BYTES``, ``BITINGLIP_BATCH_MAX_LINES`` and what is left of
the uploader's ``BITINGLIP_FILES_MAX_BYTES_PER_TENANT``.  A file is its
uploader's: another token subject gets 404 for it, and never sees it listed.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from bitinglip.errors import InputError
from bitinglip.gateway.body import query_int
from bitinglip.gateway.openai.files import FileStore, content_path, ensure_folder, new_file_id, public, receive, record
from bitinglip.gateway.state import Gateway


def _store(gw: Gateway) -> FileStore:
    return FileStore(gw.store.redis, gw.settings.results_dir)


async def create_file(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write")  # an upload is not a submission: the batch counts once
    file_id = new_file_id()
    ensure_folder(gw.settings.results_dir)
    dest = content_path(gw.settings.results_dir, file_id)
    store, quota = _store(gw), gw.settings.files_max_bytes_per_tenant
    try:
        # refused as it streams once past what is left; checked again as it is kept, for uploads side by side
        upload = await receive(request.stream(), request.headers.get("content-type", ""), dest,
                               gw.settings.batch_max_bytes, gw.settings.batch_max_lines,
                               quota_left=max(0, quota - await store.used(principal.sub)))
        meta = record(file_id, principal.sub, upload)
        await store.add(meta, quota)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return gw.json(request, public(meta))


async def list_files(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:read")
    limit = query_int(request, "limit", 10_000, 1, 10_000)
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InputError("order must be asc or desc")
    found, more = await _store(gw).page(principal.sub, request.query_params.get("after"), limit, order == "asc",
                                        request.query_params.get("purpose"))
    data = [public(meta) for meta in found]
    return gw.json(request, _page(data, more))


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


async def get_file(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:read")
    return gw.json(request, public(await _store(gw).get(principal.sub, request.path_params["file_id"])))


async def file_content(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:read")
    meta = await _store(gw).get(principal.sub, request.path_params["file_id"])
    return FileResponse(content_path(gw.settings.results_dir, meta["id"]), media_type="application/jsonl",
                        filename=meta["filename"], headers=getattr(request.state, "ratelimit", {}))


async def delete_file(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write")
    await _store(gw).delete(principal.sub, request.path_params["file_id"])
    return gw.json(request, {"id": request.path_params["file_id"], "object": "file", "deleted": True,
                             "deleted_at": int(time.time())})
