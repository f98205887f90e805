"""A chat or text completion streamed as Server-Sent Events, as the engine
produces its text (``stream: true``).

The request runs as any other online completion (the infer batcher, the
worker's engine), alone in its task so that its client's disconnect
cancels exactly its engine request; its row carries a stream id, and the
worker sends the text on as the engine grows it
(:mod:`bitinglip.gateway.streams`).  Nothing is sent before the first text
or the answer: a request that fails before (a prompt over the model's
positions, an engine that cannot start) gets its HTTP error status like an
unstreamed one; one that fails later ends with OpenAI's ``data: {"error":
...}`` event, which the official client raises.  The stream's end comes
from the whole answer (:class:`~bitinglip.gateway.openai.chunks.Chunks`).

The tenant's share of the per-tenant caps stays held until the stream ends,
however it ends; a client that disconnects lets go of the task, and the
worker's engine aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from bitinglip.errors import BitingLipError
from bitinglip.gateway.disconnect import CLIENT_CLOSED, disconnected
from bitinglip.gateway.handlers import on_domain_error
from bitinglip.gateway.openai.chunks import Chunks
from bitinglip.gateway.openai.shapes import chat_body, completion_body
from bitinglip.platform.jobs import predict_generation

#: put on a stream's queue once its task has ended (answered or failed)
_END: dict[str, Any] = {}


class EventStream(StreamingResponse):
    """``text/event-stream`` that calls ``on_close`` however the response ends (its end, an error, a
    client gone: Starlette cancels the body then, which a generator's ``finally`` would hear only when
    it is collected)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def event(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def stream_completion(request: Request, endpoint: str, row: dict[str, Any], options: dict[str, Any],
                            model: str, name: str, group: str, include_usage: bool,
                            hold: contextlib.ExitStack) -> Response:
    """Run ``row`` (a generation row of ``endpoint``'s body) on ``model`` and stream its answer, under the
    model ``name`` the client gave; ``hold`` (the tenant's share of the caps) closes when the stream ends."""
    gw = request.app.state.gateway
    sid = uuid.uuid4().hex
    inbox = gw.streams.open(sid)
    work = asyncio.ensure_future(gw.batcher.infer(
        "generate", model, options, [{**{k: v for k, v in row.items() if k != "id"}, "stream": sid}],
        predict_generation, group=f"{group}/{sid}"))
    work.add_done_callback(lambda _: inbox.put_nowait(_END))

    def close() -> None:
        work.cancel()  # a no-op once answered; else the batcher lets go of the task and the engine aborts
        gw.streams.close(sid)
        hold.close()

    try:
        first = await _first(request, inbox)
    except BaseException:
        close()
        raise
    if first is None:  # the client left first
        close()
        return Response(status_code=CLIENT_CLOSED)
    if first is _END and work.exception() is not None:
        close()
        raise work.exception()  # type: ignore[misc]  # the gateway's handlers answer it
    chunks = Chunks(endpoint, name, include_usage)
    n = int(row["params"].get("n") or 1)
    return EventStream(_events(request, chunks, n, first, inbox, work), close,
                       getattr(request.state, "ratelimit", {}))


async def _first(request: Request, inbox: asyncio.Queue[dict[str, Any]]) -> dict[str, Any] | None:
    """The stream's first event (text, or ``_END``), or None once the client has disconnected first."""
    getting = asyncio.ensure_future(inbox.get())
    watching = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait((getting, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not getting.done():
            getting.cancel()
    return getting.result() if getting.done() and not getting.cancelled() else None


async def _events(request: Request, chunks: Chunks, n: int, first: dict[str, Any],
                  inbox: asyncio.Queue[dict[str, Any]], work: asyncio.Future[Any]) -> AsyncIterator[str]:
    for chunk in chunks.opening(n):
        yield event(chunk)
    seq, msg = 0, first
    while msg is not _END:
        if seq >= 0 and msg.get("seq") == seq:
            seq += 1
            yield event(chunks.text(int(msg["index"]), str(msg["text"])))
        else:  # a gap, or a rerun on another worker starting again at 0: the rest comes with the answer
            seq = -1
        msg = await inbox.get()
    try:
        outputs, _ = work.result()
    except BitingLipError as exc:  # after its first text: OpenAI's error event, which its client raises
        answer = await on_domain_error(request, exc)
        yield event(json.loads(bytes(answer.body)))
        return
    body = (chat_body if chunks.chat else completion_body)(chunks.base["model"], outputs[0])
    for chunk in chunks.closing(body):
        yield event(chunk)
    yield "data: [DONE]\n\n"
