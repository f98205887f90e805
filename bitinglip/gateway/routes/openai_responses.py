"""OpenAI's ``POST /v1/responses``: a chat completion underneath
(:mod:`bitinglip.gateway.openai.responses_api` turns the body into a chat
row and the row's output into a ``Response``), on the same batching path,
tenant caps and disconnect handling as ``/v1/chat/completions``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from bitinglip.gateway.body import check_model_options, read_json
from bitinglip.gateway.disconnect import CLIENT_CLOSED, unless_disconnected
from bitinglip.gateway.openai.responses_api import chat_request, response_body
from bitinglip.gateway.openai.shapes import generation_row, output_options
from bitinglip.gateway.ratelimit import INFER
from bitinglip.gateway.state import Gateway
from bitinglip.gateway.tenants import generation_work
from bitinglip.platform.jobs import predict_generation
from bitinglip.platform.tasks import BUILTIN_TASKS


async def create_response(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write", INFER)
    body = await read_json(request)
    row = generation_row("/v1/chat/completions", chat_request(body), "request", gw.settings.max_text_chars)
    options = output_options(row["params"])
    task = BUILTIN_TASKS["generate"]
    merged = task.check_options(options)  # as the worker will check it: a bad value is this request's 400
    checked = task.check_row(None, {"messages": row["messages"], "params": row["params"]}, "request", merged)
    model = await gw.listed_model(body["model"])
    with gw.in_flight.hold(principal.sub, *generation_work(1, {**merged, **checked.params})):
        await check_model_options(gw, "generate", model, {**options, **row["params"]})
        gw.charge(request)
        outputs, _ = await unless_disconnected(request, gw.batcher.infer(
            "generate", model, options, [{k: v for k, v in row.items() if k != "id"}], predict_generation,
            group=principal.sub))
    if outputs is None:
        return Response(status_code=CLIENT_CLOSED)
    return gw.json(request, response_body(body["model"], outputs[0], body))
