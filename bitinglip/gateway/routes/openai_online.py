"""``POST /v1/embeddings``: OpenAI's embeddings, on the same batching path as
``/v1/infer`` (:mod:`bitinglip.gateway.batcher`): requests for one model that
arrive together run as one task, above every bulk job's priority.

``encoding_format`` float or base64 (little-endian float32, what OpenAI's
client decodes; the client asks for base64 unless told otherwise), and
``dimensions``: the first N values, rescaled to length 1.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from bitinglip.gateway.body import read_json
from bitinglip.gateway.openai.shapes import embedding_body, embedding_format, embedding_texts, refuse
from bitinglip.gateway.ratelimit import INFER
from bitinglip.gateway.state import Gateway
from bitinglip.platform.jobs import predict_counted


async def embeddings(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, "jobs:write", INFER)
    body = await read_json(request)
    texts = embedding_texts(body, gw.settings.max_text_chars)
    fmt, dims = embedding_format(body)
    if len(texts) > gw.settings.max_infer_rows:  # a larger set is a batch's work
        raise refuse(f"input has {len(texts)} items; this gateway takes {gw.settings.max_infer_rows} per request "
                     "(BITINGLIP_MAX_INFER_ROWS); send more as a batch (POST /v1/files, /v1/batches)", "input")
    model = await gw.listed_model(body["model"])
    outputs, _ = await gw.batcher.infer("embed", model, {}, texts, predict_counted)
    answer = embedding_body(body["model"], [o["embedding"] for o in outputs], fmt, dims,
                            sum(int(o["tokens"]) for o in outputs))
    return gw.json(request, answer)
