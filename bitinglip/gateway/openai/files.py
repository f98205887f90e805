"""Files of the OpenAI-compatible API: bytes under the results directory,
records in Redis (and beside the bytes, so a Redis that lost them is no loss).

An upload is a ``multipart/form-data`` body; its file part is parsed as it
arrives and written straight to its place, counting bytes and lines, so
neither the gateway's memory nor a temporary folder ever holds it whole.

A body must end with its closing boundary and carry one ``file`` part; the
filename keeps its last path segment.  Uploads count against the uploader's
quota (``BITINGLIP_FILES_MAX_BYTES_PER_TENANT``) until deleted or expired:
``expires_after`` as OpenAI takes it (``anchor`` created_at, 1 hour to 30
days; a batch file without one expires after 30 days, OpenAI's default).  An
expired file is deleted when next read or listed, and by the gateway's sweep.
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
from bitinglip.errors import InputError, NotFoundError, PayloadTooLargeError, QuotaExceededError
from bitinglip.gateway.openai.bodies import EXPIRES_MAX_S, EXPIRES_MIN_S
from bitinglip.gateway.schemas import refuse

#: the folder under BITINGLIP_RESULTS_DIR that holds the files (``_``: no job's folder looks like it)
FILES_DIR = "_openai_files"
PURPOSES = ("batch", "batch_output")
#: the largest form field (purpose) an upload may carry besides its file
_MAX_FIELD_BYTES = 1024
#: form fields an upload may carry besides its file (purpose, expires_after's two, and room to spare)
_MAX_FIELDS = 8
_FILE_ID = "file-"
#: OpenAI's default expiry for batch files
DEFAULT_BATCH_EXPIRY_S = EXPIRES_MAX_S
_EXPIRES_FIELDS = ("expires_after[anchor]", "expires_after[seconds]")

# KEYS: the file, the owner's index, the owner's byte count, the expiry index.
# ARGV: id, created_at, counted bytes, quota (0: none), expires_at ('': never), then field, value pairs.
# Returns {added 0/1, bytes counted before}.
_ADD = """
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local counted, quota = tonumber(ARGV[3]), tonumber(ARGV[4])
if quota > 0 and counted > 0 and used + counted > quota then return {0, used} end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if counted > 0 then redis.call('INCRBY', KEYS[3], counted) end
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1]) end
return {1, used}
"""
# KEYS as _ADD's; ARGV: id.  Gives the bytes back once, however many gateways delete at once.
_REMOVE = """
local counted = tonumber(redis.call('HGET', KEYS[1], 'counted') or '0')
if redis.call('DEL', KEYS[1]) == 1 and counted > 0 then
  if redis.call('DECRBY', KEYS[3], counted) <= 0 then redis.call('DEL', KEYS[3]) end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""


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
            "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed",
            "expires_at": expires_at(meta), "status_details": None}


def expires_at(meta: dict[str, Any]) -> int | None:
    raw = meta.get("expires_at")
    return int(float(raw)) if raw not in (None, "", "None") else None


def expired(meta: dict[str, Any], now: float | None = None) -> bool:
    when = expires_at(meta)
    return when is not None and when <= (time.time() if now is None else now)


def expiry_seconds(anchor: Any, seconds: Any, param: str) -> int:
    """``expires_after``'s seconds, once ``anchor`` and ``seconds`` are within OpenAI's rules."""
    if anchor != "created_at":
        raise refuse(f"{param}.anchor must be 'created_at' (got {anchor!r:.40})", param)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not EXPIRES_MIN_S <= seconds <= EXPIRES_MAX_S:
        raise refuse(f"{param}.seconds must be a whole number from {EXPIRES_MIN_S} to {EXPIRES_MAX_S} "
                     f"(got {seconds!r:.40})", param)
    return seconds


def safe_filename(raw: bytes | None) -> str:
    """The uploaded name without its path (``../x`` is ``x``) or control characters."""
    name = (raw or b"").decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:255]
    return name if name not in ("", ".", "..") else "upload.jsonl"


@dataclass
class Upload:
    filename: str
    purpose: str
    bytes: int
    lines: int
    #: seconds after creation that the file expires (None: never)
    expires_after_s: int | None = None


async def receive(chunks: AsyncIterator[bytes], content_type: str, dest: Path, max_bytes: int,
                  max_lines: int, quota_left: int | None = None) -> Upload:
    """Parse a multipart upload from ``chunks``, writing its ``file`` part to
    ``dest``; refuse it once it passes ``max_bytes``, ``max_lines`` or the
    uploader's ``quota_left``, and a body that ends early or repeats a part."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

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
        # a second part of a name would be appended to the first: two files would read as one
        if state["name"] in fields or (state["name"] == "file" and "filename" in found):
            raise refuse(f"the upload has more than one {state['name'][:64]!r} part; send one", state["name"][:64])
        if state["name"] != "file" and len(fields) >= _MAX_FIELDS:
            raise refuse(f"the upload has over {_MAX_FIELDS} form fields; send file, purpose and expires_after", "file")
        if state["name"] == "file":
            found["filename"] = safe_filename(disposition.get(b"filename"))
        else:
            fields[state["name"]] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if state["name"] == "file":
            sizes["bytes"] += len(piece)
            sizes["lines"] += piece.count(b"\n")
            if piece:
                sizes["last"] = piece[-1:]
            if sizes["bytes"] > max_bytes:
                raise PayloadTooLargeError(f"the file is over {max_bytes} bytes (BITINGLIP_BATCH_MAX_BYTES)")
            if quota_left is not None and sizes["bytes"] > quota_left:
                raise quota_error(quota_left)
            if sizes["lines"] > max_lines:
                raise PayloadTooLargeError(f"the file has over {max_lines} lines (BITINGLIP_BATCH_MAX_LINES)")
            out.write(piece)
        else:
            value = fields[state["name"]] + piece
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
    if parser.state != MultipartState.END:  # the parser itself takes a cut-off body as whole
        raise refuse("the multipart body ends before its closing boundary: the upload was cut off; send it again",
                     "file")
    if "filename" not in found:
        raise refuse("the upload has no 'file' part", "file")
    purpose = fields.get("purpose", b"").decode("utf-8", "replace")
    if purpose != "batch":
        raise refuse(f"purpose must be 'batch' (got {purpose!r}); this gateway keeps batch input files", "purpose")
    lines = sizes["lines"] + (1 if sizes["bytes"] and sizes["last"] != b"\n" else 0)
    expiry = {name: fields[name].decode("utf-8", "replace") for name in _EXPIRES_FIELDS if name in fields}
    expires_after_s = DEFAULT_BATCH_EXPIRY_S
    if expiry:
        seconds = expiry.get(_EXPIRES_FIELDS[1], "")
        expires_after_s = expiry_seconds(expiry.get(_EXPIRES_FIELDS[0]),  # a form field is text
                                         int(seconds) if seconds.strip().isdigit() else seconds, "expires_after")
    return Upload(found["filename"], purpose, sizes["bytes"], lines, expires_after_s)


def quota_error(left: int) -> QuotaExceededError:
    return QuotaExceededError(f"this upload would take your files past your quota: {left} bytes of it are left "
                              "(BITINGLIP_FILES_MAX_BYTES_PER_TENANT); delete files (DELETE /v1/files/{id}) or let "
                              "them expire")


class FileStore:
    """File records: one Redis hash per file, one sorted set per owner; the
    same record as JSON beside the bytes, read back when Redis lost it.  The
    bytes of an owner's uploads are counted in Redis as files come and go."""

    def __init__(self, redis: Any, results_dir: Path) -> None:
        self.redis = redis
        self.dir = folder(results_dir)
        self.results_dir = Path(results_dir)
        self._add = redis.register_script(_ADD)
        self._remove = redis.register_script(_REMOVE)

    @staticmethod
    def _keys(owner: str, file_id: str) -> list[str]:
        return [keys.openai_file(file_id), keys.openai_files(owner), keys.openai_file_bytes(owner),
                keys.openai_file_expiry()]

    async def used(self, owner: str) -> int:
        """Bytes of ``owner``'s uploads held now."""
        return int(await self.redis.get(keys.openai_file_bytes(owner)) or 0)

    async def add(self, meta: dict[str, Any], quota: int = 0) -> None:
        """Keep the file's record; with ``quota``, refuse (before anything is
        kept) a counted file that would take its owner past it."""
        flat = [part for k, v in meta.items() if v is not None for part in (k, str(v))]
        added, used = await self._add(keys=self._keys(meta["owner"], meta["id"]), args=[
            meta["id"], float(meta["created_at"]), int(meta.get("counted") or 0), quota,
            "" if meta.get("expires_at") is None else meta["expires_at"], *flat])
        if not int(added):
            raise quota_error(max(0, quota - int(used)))
        try:
            write_json_atomically(str(self.dir / f"{meta['id']}.json"), meta)
        except BaseException:
            await self._remove(keys=self._keys(meta["owner"], meta["id"]), args=[meta["id"]])
            raise

    async def get(self, owner: str, file_id: str) -> dict[str, Any]:
        """The caller's file; another subject's is as absent as a missing one,
        and an expired one is deleted and absent."""
        meta: dict[str, Any] | None = None
        if is_file_id(file_id):
            meta = await self.redis.hgetall(keys.openai_file(file_id)) or self._from_disk(file_id)
        if not meta or meta.get("owner") != owner or not content_path(self.results_dir, file_id).exists():
            raise NotFoundError(f"no file {file_id!r}")
        if expired(meta):
            await self._drop(owner, file_id)
            raise NotFoundError(f"no file {file_id!r} (it expired at {expires_at(meta)})")
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
        now = time.time()
        for file_id in ids:
            raw = await self.redis.hgetall(keys.openai_file(file_id))
            if raw and expired(raw, now):
                await self._drop(owner, file_id)
                continue
            if raw and (purpose is None or raw.get("purpose") == purpose):
                if len(found) == limit:
                    return found, True
                found.append(raw)
        return found, False

    async def delete(self, owner: str, file_id: str) -> None:
        await self.get(owner, file_id)
        await self._drop(owner, file_id)

    async def _drop(self, owner: str, file_id: str) -> None:
        await self._remove(keys=self._keys(owner, file_id), args=[file_id])
        for path in (content_path(self.results_dir, file_id), self.dir / f"{file_id}.json"):
            path.unlink(missing_ok=True)

    async def sweep(self, now: float | None = None) -> int:
        """Delete every file that has expired; how many were."""
        due = await self.redis.zrangebyscore(keys.openai_file_expiry(), "-inf", time.time() if now is None else now)
        for file_id in due:
            owner = await self.redis.hget(keys.openai_file(file_id), "owner")
            if owner is None:  # its record is gone: only the worklist entry is left
                await self.redis.zrem(keys.openai_file_expiry(), file_id)
                continue
            await self._drop(owner, file_id)
        return len(due)


def record(file_id: str, owner: str, upload: Upload, purpose: str | None = None) -> dict[str, Any]:
    now = time.time()
    expires = None if upload.expires_after_s is None else int(now) + upload.expires_after_s
    return {"id": file_id, "owner": owner, "filename": upload.filename, "purpose": purpose or upload.purpose,
            "bytes": upload.bytes, "lines": upload.lines, "created_at": now, "expires_at": expires,
            # an upload counts against its owner's quota; the files a batch writes do not
            "counted": upload.bytes if (purpose or upload.purpose) == "batch" else 0}


def ensure_folder(results_dir: Path) -> Path:
    path = folder(results_dir)
    os.makedirs(path, exist_ok=True)
    return path


def size_and_lines_record(file_id: str, owner: str, path: str, filename: str,
                          expires_after_s: int | None = None) -> dict[str, Any]:
    """The record of a file the gateway wrote itself (a batch's output or errors)."""
    with open(path, "rb") as fh:
        lines = sum(1 for _ in fh)
    now = time.time()
    return {"id": file_id, "owner": owner, "filename": filename, "purpose": "batch_output",
            "bytes": os.path.getsize(path), "lines": lines, "created_at": now,
            "expires_at": None if expires_after_s is None else int(now) + expires_after_s}
