"""Errors to HTTP responses: the one table, and the error body.

Every error body is ``{"error": {"code", "message", "request_id"}}``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Scope

from bitinglip.platform import errors

log = logging.getLogger(__name__)

#: domain error -> HTTP status; subclasses are looked up through their MRO
STATUS: dict[type[errors.BitingLipError], int] = {
    errors.InputError: 422,
    errors.UnknownTaskError: 422,
    errors.UnknownModelError: 422,
    errors.UnauthorizedError: 401,
    errors.ForbiddenError: 403,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.PayloadTooLargeError: 413,
    errors.RateLimitedError: 429,
    errors.NoGPUWorkersError: 503,
    errors.UnavailableError: 503,
    errors.ModelLoadError: 502,
    errors.JobFailedError: 502,
    errors.JobCancelledError: 409,
    errors.ModelInUseError: 409,
    errors.OutputConflictError: 409,
    errors.IntegrityError: 422,
    errors.UnsafeWeightsError: 422,
    errors.ModelSourceError: 422,
    errors.JobTimeoutError: 504,
    errors.PartitionFailedError: 502,
}

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
              422: "invalid_input", 429: "rate_limited", 500: "internal", 503: "unavailable"}


def request_id(scope: Scope) -> str:
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = uuid.uuid4().hex
    return str(state["request_id"])


def error_response(scope: Scope, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    rid = request_id(scope)
    return JSONResponse({"error": {"code": code, "message": message, "request_id": rid}}, status_code=status,
                        headers={**(headers or {}), "X-Request-ID": rid})


def status_of(exc: errors.BitingLipError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.BitingLipError)
    status = status_of(exc)
    if status >= 500:
        log.warning("request %s failed: %s", request_id(request.scope), exc)
    return error_response(request.scope, status, exc.code, str(exc), getattr(exc, "headers", None))


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(request.scope, exc.status_code, HTTP_CODES.get(exc.status_code, "error"),
                          str(exc.detail), dict(exc.headers or {}))


async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
    # job status lives in Redis: without it, say so rather than answer "no such job"
    log.warning("request %s failed: Redis unreachable: %s", request_id(request.scope), exc)
    return error_response(request.scope, 503, errors.UnavailableError.code,
                          "the job status store (Redis) is unreachable; retry shortly", {"Retry-After": "1"})


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request %s failed", request_id(request.scope))
    return error_response(request.scope, 500, "internal", "internal error; quote the request id")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    errors.BitingLipError: on_domain_error,
    HTTPException: on_http_error,
    RedisConnectionError: on_redis_down,
    RedisTimeoutError: on_redis_down,
    Exception: on_unexpected,
}
