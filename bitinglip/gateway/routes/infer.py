"""``POST /v1/infer``: small synchronous requests, batched for a moment.

Requests for the same task, model and options that arrive within
``BITINGLIP_INFER_BATCH_MS`` of each other go to the cluster as one task
(:mod:`bitinglip.gateway.batcher`), at a Dask priority above every bulk job,
so they start before queued partitions.  Each request's rows and options are
checked before it joins a batch; should a merged batch fail all the same,
each of its requests runs again alone, so only the bad one fails.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from bitinglip.gateway.body import check_model_options, check_task, check_texts, read_json
from bitinglip.gateway.disconnect import CLIENT_CLOSED, unless_disconnected
from bitinglip.gateway.ratelimit import INFER
from bitinglip.gateway.schemas import InferRequest, parse
from bitinglip.gateway.state import Gateway
from bitinglip.gateway.tenants import generation_work
from bitinglip.platform.tasks import BUILTIN_TASKS


async def infer(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    principal = await gw.authorize(request, "jobs:write", INFER)
    body = parse(InferRequest, await read_json(request))
    options = check_task(body.task, body.options)
    texts = check_texts(body.inputs, gw.settings.max_infer_rows, gw.settings.max_text_chars, "inputs")
    model = await gw.listed_model(body.model)
    await check_model_options(gw, body.task, model, options)
    if not BUILTIN_TASKS[body.task].engine_driven:
        gw.charge(request)
        outputs, shared = await gw.batcher.infer(body.task, model, options, texts)
    else:  # generation: the tenant's caps, and a client that leaves lets go of its engine requests
        work = generation_work(len(texts), BUILTIN_TASKS[body.task].check_options(options))
        with gw.in_flight.hold(principal.sub, *work):
            gw.charge(request)
            outputs, shared = await unless_disconnected(request, gw.batcher.infer(body.task, model, options, texts,
                                                                                  group=principal.sub))
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED)
    return gw.json(request, {"task": body.task, "model": body.model, "outputs": outputs,
                             "batched_requests": shared})
