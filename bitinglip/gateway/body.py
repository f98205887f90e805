"""Reading request bodies and query parameters, with errors that say what is wrong."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from bitinglip.platform.errors import InputError


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body, or an :class:`InputError`."""
    if "json" not in request.headers.get("content-type", ""):
        raise InputError("send the body as JSON with Content-Type: application/json")
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    return body


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"query parameter {name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise InputError(f"query parameter {name}={value} must be between {low} and {high}")
    return value
