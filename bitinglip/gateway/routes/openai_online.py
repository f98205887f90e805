"""OpenAI's online routes, ``POST /v1/embeddings``, ``/v1/chat/completions``
and ``/v1/completions``, on the same batching path as ``/v1/infer``
(:mod:`bitinglip.gateway.batcher`): requests for one model that arrive
together run as one task, above every bulk job's priority (generation rows
then share the worker's engine with whatever else it runs).  A streamed
completion is sent as the engine produces its text
(:mod:`bitinglip.gateway.streaming`).

A completion holds its tenant's share of the per-tenant caps
(:mod:`bitinglip.gateway.tenants`) while it waits, and a client that
disconnects meanwhile lets go of its request: the batcher cancels the
cluster's task once nobody waits for it, and the worker's engine aborts its
requests.

``encoding_format`` float or base64 (little-endian float32, what OpenAI's
client decodes; the client asks for base64 unless told otherwise), and
``dimensions``: the first N values, rescaled to length 1.
"""

from __future__ import annotations

import contextlib

import anyio
from starlette.requests import Request
from starlette.responses import Response

from bitinglip.errors import BitingLipError
from bitinglip.gateway.body import check_model_options, read_json
from bitinglip.gateway.disconnect import CLIENT_CLOSED, unless_disconnected
from bitinglip.gateway.openai.bodies import REQUESTS, EmbeddingRequest
from bitinglip.gateway.openai.shapes import (
    chat_body,
    completion_body,
    embedding_body,
    embedding_texts,
    generation_row,
    output_options,
    stream_flags,
)
from bitinglip.gateway.ratelimit import INFER
from bitinglip.gateway.schemas import parse, refuse
from bitinglip.gateway.state import Gateway
from bitinglip.gateway.streaming import stream_completion
from bitinglip.gateway.tenants import generation_work
from bitinglip.platform.jobs import predict_counted, predict_generation
from bitinglip.platform.models import resolve_model
from bitinglip.platform.tasks import BUILTIN_TASKS, model_limits


async def embeddings(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "jobs:write", INFER)
    body = parse(EmbeddingRequest, await read_json(request))
    texts = embedding_texts(body, gw.settings.max_text_chars)
    fmt, dims = body.encoding_format, body.dimensions
    if len(texts) > gw.settings.max_infer_rows:  # a larger set is a batch's work
        raise refuse(f"input has {len(texts)} items; this gateway takes {gw.settings.max_infer_rows} per request "
                     "(BITINGLIP_MAX_INFER_ROWS); send more as a batch (POST /v1/files, /v1/batches)", "input")
    model = await gw.listed_model(body.model)
    await _check_dimensions(gw, model, dims)
    gw.charge(request)
    outputs, _ = await gw.batcher.infer("embed", model, {}, texts, predict_counted)
    answer = embedding_body(body.model, [o["embedding"] for o in outputs], fmt, dims,
                            sum(int(o["tokens"]) for o in outputs))
    return gw.json(request, answer)


async def _check_dimensions(gw: Gateway, model: str, dims: int | None) -> None:
    """Refuse ``dimensions`` past the model's width before any work runs (a
    model only the workers can see is checked once its vectors are back)."""
    if dims is None:
        return
    try:
        path = await anyio.to_thread.run_sync(resolve_model, model, gw.settings)
    except (BitingLipError, OSError):
        return
    width = (await anyio.to_thread.run_sync(model_limits, path.path)).hidden
    if width is not None and dims > width:
        raise refuse(f"dimensions={dims} is more than the model's {width}", "dimensions")


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "/v1/chat/completions")


async def completions(request: Request) -> Response:
    return await _generate(request, "/v1/completions")


async def _generate(request: Request, endpoint: str) -> Response:
    """One chat or text completion through the infer batcher; with
    ``stream: true`` the answer goes out as OpenAI's chunks, ending with
    ``data: [DONE]``."""
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write", INFER)
    body = parse(REQUESTS[endpoint], await read_json(request))
    row = generation_row(endpoint, body, "request", gw.settings.max_text_chars)
    stream, include_usage = stream_flags(body)
    options = output_options(row["params"])
    task = BUILTIN_TASKS["generate"]
    # checked here as the worker will check it, so a bad value is this request's 400, before it joins a batch
    merged = task.check_options(options)
    checked = task.check_row(row.get("text"), {"messages": row.get("messages"), "params": row["params"]}, "request",
                             merged)
    model = await gw.listed_model(body.model)
    with contextlib.ExitStack() as held:
        held.enter_context(gw.in_flight.hold(principal.sub, *generation_work(1, {**merged, **checked.params})))
        # the cheap check first, then against the model (top_k within its vocabulary, max_tokens within its
        # positions), as a job's options are
        await check_model_options(gw, "generate", model, {**options, **row["params"]})
        gw.charge(request)
        if stream:  # the stream holds the tenant's share until it ends
            return await stream_completion(request, endpoint, row, options, model, body.model, principal.sub,
                                           include_usage, held.pop_all())
        outputs, _ = await unless_disconnected(request, gw.batcher.infer(
            "generate", model, options, [{k: v for k, v in row.items() if k != "id"}], predict_generation,
            group=principal.sub))
    if outputs is None:
        return Response(status_code=CLIENT_CLOSED)
    chat = endpoint == "/v1/chat/completions"
    return gw.json(request, (chat_body if chat else completion_body)(body.model, outputs[0]))
