"""ASGI middleware: a request id and metrics on every request, a 500 that
keeps the connection for an error no handler took, a cap on request body
size, and a deadline for the body to arrive."""

from __future__ import annotations

import re
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bitinglip.errors import PayloadTooLargeError, RequestTimeoutError
from bitinglip.gateway.handlers import error_response, on_unexpected, request_id
from bitinglip.gateway.metrics import Metrics
from bitinglip.logs import REQUEST_ID

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContext:
    """Gives each request an id (the client's ``X-Request-ID`` when it is
    sane), echoes it in the response, and records the request's metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        scope.setdefault("state", {})["request_id"] = given if _CLIENT_ID.match(given) else None
        if not scope["state"]["request_id"]:
            del scope["state"]["request_id"]
        rid = request_id(scope)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        token = REQUEST_ID.set(rid)  # for every log line written while this request is served
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
            route: Any = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], label, status, time.perf_counter() - started)


class UnexpectedErrors:
    """The 500 of an exception no handler took (:func:`on_unexpected`), and
    the connection kept.  Starlette's own last resort sends its 500 and
    raises again for the server to log, and uvicorn closes a connection whose
    app raised after its response started: the client's next request on that
    kept-alive connection met a reset."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:  # half a response is out: only closing the connection ends it
                raise
            response = await on_unexpected(Request(scope, receive), exc)
            await response(scope, receive, send)


class BodyLimit:
    """413 for a body over ``max_bytes`` (or over ``overrides[path]`` for
    a path named there): at once from ``Content-Length``, or while reading a
    body sent without one."""

    def __init__(self, app: ASGIApp, max_bytes: int, overrides: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.overrides = dict(overrides or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.overrides.get(scope.get("path", ""), self.max_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            message = f"request body over {limit} bytes" if length.isdigit() else "bad Content-Length"
            response = error_response(scope, 413 if length.isdigit() else 400,
                                      "payload_too_large" if length.isdigit() else "bad_request", message)
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLargeError(f"request body over {limit} bytes")
            return message

        await self.app(scope, counted, send)


class BodyTimeout:
    """408 for a body that has not fully arrived ``timeout_s`` after the app
    first asked for it: a client that trickles its body would otherwise hold
    a connection and a task for as long as it likes (uvicorn has no such
    limit).  Once the body is in, ``receive`` is the server's again (a stream
    waits on it for the disconnect)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline: float | None = None
        done = False

        async def timed() -> Message:
            nonlocal deadline, done
            if done:
                return await receive()
            deadline = deadline or anyio.current_time() + self.timeout_s
            with anyio.move_on_after(deadline - anyio.current_time()) as waited:
                message = await receive()
            if waited.cancelled_caught:
                raise RequestTimeoutError(f"the request body did not arrive within {self.timeout_s:g} s")
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)
