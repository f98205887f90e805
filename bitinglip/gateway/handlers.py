"""Errors to HTTP responses: the one table, and the error body.

Every error body is ``{"error": {"message", "type", "param", "code", "request_id"}}``: OpenAI's
error shape (its client picks the exception class from the status and reads
``message``, ``type``, ``param`` and ``code``) with BitingLip's request id.  On
the OpenAI-compatible routes a refused value is 400, as OpenAI answers it
(``openai.BadRequestError``); BitingLip's own routes keep 422.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Scope

from bitinglip import errors

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
    errors.OutputWriteError: 507,
    errors.RequestTimeoutError: 408,
    errors.EngineError: 502,
}

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 413: "payload_too_large",
              415: "unsupported_media_type", 422: "invalid_input", 429: "rate_limited", 500: "internal",
              503: "unavailable", 507: "insufficient_storage"}

#: OpenAI's error ``type`` per status; anything else the caller sent wrong is an invalid request
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               409: "conflict_error", 429: "rate_limit_error"}
#: the OpenAI-compatible routes (their prefixes), where 422 reads 400 as OpenAI's clients expect
OPENAI_PATHS = ("/v1/files", "/v1/batches", "/v1/embeddings", "/v1/chat/completions", "/v1/completions",
                "/v1/responses")

#: statuses of requests refused for what the caller sent: they give back their rate-limit slot
INVALID = frozenset({400, 413, 415, 422})

#: a Dask address (tcp://10.0.0.7:40123, tls://[::1]:8786, inproc://...), with a WorkerState's quotes
_ADDRESS = re.compile(r"<WorkerState [^>]*>|'?\b(?:tcp|tls|inproc|ucx|ws|wss)://[^\s'\">,)]+'?")


def request_id(scope: Scope) -> str:
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = uuid.uuid4().hex
    return str(state["request_id"])


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return ERROR_TYPES.get(status, "invalid_request_error")


def error_response(scope: Scope, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    rid = request_id(scope)
    if status == 422 and str(scope.get("path", "")).startswith(OPENAI_PATHS):
        status = 400
    body = {"message": message, "type": error_type(status), "param": param, "code": code, "request_id": rid}
    return JSONResponse({"error": body}, status_code=status, headers={**(headers or {}), "X-Request-ID": rid})


def status_of(exc: errors.BitingLipError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def scrub(message: str) -> str:
    """``message`` without the cluster's internal addresses: a caller learns
    that a worker failed, not where the workers listen."""
    return _ADDRESS.sub("a worker", message)


async def refund(request: Request, status: int) -> None:
    verdict = getattr(request.state, "rate_verdict", None)
    if status in INVALID and verdict is not None:
        try:
            await request.app.state.gateway.limiter.refund(verdict)
        except Exception:
            log.warning("request %s: giving back its rate-limit slot failed", request_id(request.scope),
                        exc_info=True)


async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.BitingLipError)
    status = status_of(exc)
    message = str(exc)
    if status >= 500:
        log.warning("request %s failed: %s", request_id(request.scope), exc)  # the full text stays here
        message = scrub(message)
    await refund(request, status)
    return error_response(request.scope, status, exc.code, message, getattr(exc, "headers", None),
                          getattr(exc, "param", None))


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    await refund(request, exc.status_code)
    return error_response(request.scope, exc.status_code, HTTP_CODES.get(exc.status_code, "error"),
                          str(exc.detail), dict(exc.headers or {}))


async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
    # job status lives in Redis: without it, say so rather than answer "no such job"
    log.warning("request %s failed: Redis unreachable: %s", request_id(request.scope), exc)
    if "No connection available" in str(exc):  # the pool's wait ran out: Redis is up, the gateway is busy
        return error_response(request.scope, 503, errors.UnavailableError.code,
                              "the gateway is at its limit of Redis connections; retry shortly", {"Retry-After": "1"})
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
