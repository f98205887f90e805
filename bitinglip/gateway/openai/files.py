"""Files of the OpenAI-compatible API: bytes under the results directory,
records in Redis (and beside the bytes, so a Redis that lost them is no loss).

An upload is a ``multipart/form-data`` body; its file part is parsed as it
arrives and written straight to its place, counting bytes and lines, so
neither the gateway's memory nor a temporary folder ever holds it whole.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitinglip import redis_keys as keys
from bitinglip.atomic import write_json_atomically
from bitinglip.errors import InputError, NotFoundError, PayloadTooLargeError
from bitinglip.gateway.openai.shapes import refuse

#: the folder under BITINGLIP_RESULTS_DIR that holds the files (``_``: no job's folder looks like it)
FILES_DIR = "_openai_files"
PURPOSES = ("batch", "batch_output")
#: the largest form field (purpose) an upload may carry besides its file
_MAX_FIELD_BYTES = 1024
_FILE_ID = "file-"


def folder(results_dir: Path) -> Path:
    return Path(results_dir) / FILES_DIR


def content_path(results_dir: Path, file_id: str) -> Path:
    return folder(results_dir) / f"{file_id}.jsonl"


def new_file_id() -> str:
    return f"{_FILE_ID}{uuid.uuid4().hex}"


def is_file_id(value: str) -> bool:
    tail = value.removeprefix(_FILE_ID)
    return value.startswith(_FILE_ID) and 0 < len(tail) <= 64 and tail.replace("-", "").isalnum()


def public(meta: dict[str, Any]) -> dict[str, Any]:
    """A file record as OpenAI's ``FileObject``."""
    return {"id": meta["id"], "object": "file", "bytes": int(meta["bytes"]), "created_at": int(float(meta["created_at"])),
            "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


@dataclass
class Upload:
    filename: str
    purpose: str
    bytes: int
    lines: int


async def receive(chunks: AsyncIterator[bytes], content_type: str, dest: Path, max_bytes: int,
                  max_lines: int) -> Upload:
    """Parse a multipart upload from ``chunks``, writing its ``file`` part to
    ``dest``; refuse it once it passes ``max_bytes`` or ``max_lines``."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise refuse("send the file as multipart/form-data with a 'file' part and purpose=batch", "file")
    state: dict[str, Any] = {"name": None, "filename": None, "header": b"", "value": b"", "headers": {}}
    fields: dict[str, bytes] = {}
    sizes = {"bytes": 0, "lines": 0, "last": b""}
    found: dict[str, str] = {}
    # written as the parser hands over each piece (tens of KiB): the event loop never waits on a whole file
    out = open(dest, "wb")  # noqa: SIM115, ASYNC230 - closed in the finally below

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header"].lower()] = state["value"]
        state["header"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        state["filename"] = disposition.get(b"filename")
        if state["name"] == "file":
            found["filename"] = (state["filename"] or b"upload.jsonl").decode("utf-8", "replace")[:255]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if state["name"] == "file":
            sizes["bytes"] += len(piece)
            sizes["lines"] += piece.count(b"\n")
            if piece:
                sizes["last"] = piece[-1:]
            if sizes["bytes"] > max_bytes:
                raise PayloadTooLargeError(f"the file is over {max_bytes} bytes (BITINGLIP_BATCH_MAX_BYTES)")
            if sizes["lines"] > max_lines:
                raise PayloadTooLargeError(f"the file has over {max_lines} lines (BITINGLIP_BATCH_MAX_LINES)")
            out.write(piece)
        else:
            value = fields.get(state["name"], b"") + piece
            if len(value) > _MAX_FIELD_BYTES:
                raise InputError(f"form field {state['name']!r} is over {_MAX_FIELD_BYTES} bytes")
            fields[state["name"]] = value

    def on_part_end() -> None:
        state["headers"], state["name"] = {}, None

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:  # a malformed body
        raise InputError(f"the multipart body cannot be read: {exc}") from None
    finally:
        out.close()
    if "filename" not in found:
        raise refuse("the upload has no 'file' part", "file")
    purpose = fields.get("purpose", b"").decode("utf-8", "replace")
    if purpose != "batch":
        raise refuse(f"purpose must be 'batch' (got {purpose!r}); this gateway keeps batch input files", "purpose")
    lines = sizes["lines"] + (1 if sizes["bytes"] and sizes["last"] != b"\n" else 0)
    return Upload(found["filename"], purpose, sizes["bytes"], lines)


class FileStore:
    """File records: one Redis hash per file, one sorted set per owner; the
    same record as JSON beside the bytes, read back when Redis lost it."""

    def __init__(self, redis: Any, results_dir: Path) -> None:
        self.redis = redis
        self.dir = folder(results_dir)
        self.results_dir = Path(results_dir)

    async def add(self, meta: dict[str, Any]) -> None:
        write_json_atomically(str(self.dir / f"{meta['id']}.json"), meta)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.openai_file(meta["id"]), mapping={k: str(v) for k, v in meta.items()})
            pipe.zadd(keys.openai_files(meta["owner"]), {meta["id"]: float(meta["created_at"])})
            await pipe.execute()

    async def get(self, owner: str, file_id: str) -> dict[str, Any]:
        """The caller's file; another subject's is as absent as a missing one."""
        meta: dict[str, Any] | None = None
        if is_file_id(file_id):
            meta = await self.redis.hgetall(keys.openai_file(file_id)) or self._from_disk(file_id)
        if not meta or meta.get("owner") != owner or not content_path(self.results_dir, file_id).exists():
            raise NotFoundError(f"no file {file_id!r}")
        return dict(meta)

    def _from_disk(self, file_id: str) -> dict[str, Any] | None:
        try:
            with open(self.dir / f"{file_id}.json") as fh:
                return dict(json.load(fh))
        except (OSError, ValueError):
            return None

    async def page(self, owner: str, after: str | None, limit: int, ascending: bool,
                   purpose: str | None) -> tuple[list[dict[str, Any]], bool]:
        """The owner's files after the cursor ``after``, and whether more follow."""
        index = keys.openai_files(owner)
        ids = await (self.redis.zrange(index, 0, -1) if ascending else self.redis.zrevrange(index, 0, -1))
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        found: list[dict[str, Any]] = []
        for file_id in ids:
            raw = await self.redis.hgetall(keys.openai_file(file_id))
            if raw and (purpose is None or raw.get("purpose") == purpose):
                if len(found) == limit:
                    return found, True
                found.append(raw)
        return found, False

    async def delete(self, owner: str, file_id: str) -> None:
        await self.get(owner, file_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.openai_file(file_id))
            pipe.zrem(keys.openai_files(owner), file_id)
            await pipe.execute()
        for path in (content_path(self.results_dir, file_id), self.dir / f"{file_id}.json"):
            path.unlink(missing_ok=True)


def record(file_id: str, owner: str, upload: Upload, purpose: str | None = None) -> dict[str, Any]:
    return {"id": file_id, "owner": owner, "filename": upload.filename, "purpose": purpose or upload.purpose,
            "bytes": upload.bytes, "lines": upload.lines, "created_at": time.time()}


def ensure_folder(results_dir: Path) -> Path:
    path = folder(results_dir)
    os.makedirs(path, exist_ok=True)
    return path


def size_and_lines_record(file_id: str, owner: str, path: str, filename: str) -> dict[str, Any]:
    """The record of a file the gateway wrote itself (a batch's output or errors)."""
    with open(path, "rb") as fh:
        lines = sum(1 for _ in fh)
    return {"id": file_id, "owner": owner, "filename": filename, "purpose": "batch_output",
            "bytes": os.path.getsize(path), "lines": lines, "created_at": time.time()}
