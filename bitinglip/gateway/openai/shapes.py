"""OpenAI request bodies to BitingLip rows, and BitingLip outputs to OpenAI
response bodies, for embeddings, chat completions and text completions.

Pure functions (no HTTP, no Redis): the online routes and the batch files use
the same ones, so a batch line's body and an online request read alike.  A
refused value raises :class:`~bitinglip.errors.InputError` whose ``param``
names the field, as OpenAI's errors do.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from bitinglip.errors import InputError
from bitinglip.gateway.openai.bodies import (
    SAMPLING,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from bitinglip.gateway.schemas import parse, refuse
from bitinglip.platform.tasks import texts_or_error

#: the BitingLip task behind each OpenAI endpoint
ENDPOINTS = {"/v1/embeddings": "embed", "/v1/chat/completions": "generate", "/v1/completions": "generate",
             "/v1/responses": "generate"}

# --- embeddings

def embedding_texts(body: EmbeddingRequest, max_chars: int) -> list[str]:
    """The texts of an embeddings body: ``input`` is one string, or a list of
    them (one embedding each, in order)."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise refuse(f"input[{i}] has {len(text)} characters; the limit is {max_chars}", "input")
    try:
        texts_or_error(texts, [f"input[{i}]" for i in range(len(texts))])  # e.g. a lone surrogate
    except InputError as exc:
        raise refuse(str(exc), "input") from None
    return texts


def shape_vector(vector: Sequence[float], fmt: str, dims: int | None) -> list[float] | str:
    """One embedding as OpenAI sends it.  ``dims`` keeps the first ``dims``
    values and rescales them to length 1 (Matryoshka truncation: a cut
    vector is no longer unit length, and cosine scores expect one)."""
    values = [float(v) for v in vector]
    if dims is not None:
        if dims > len(values):
            raise refuse(f"dimensions={dims} is more than the model's {len(values)}", "dimensions")
        values = values[:dims]
        norm = math.sqrt(sum(v * v for v in values))
        if norm > 0:
            values = [v / norm for v in values]
    if fmt == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return values


def embedding_body(model: str, vectors: Sequence[Sequence[float]], fmt: str, dims: int | None,
                   prompt_tokens: int | None) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": shape_vector(v, fmt, dims)}
            for i, v in enumerate(vectors)]
    # None where the tokens are not known (a batch's embed job counts them per partition, not per row)
    usage = None if prompt_tokens is None else {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


# --- chat and text completions: body -> a row of the generation row contract

def sampling_params(body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The row's ``params``: the body's sampling options under the contract's
    names.  Their bounds are the contract's (the body's model checked them);
    the generate task checks them again per model."""
    params = {name: getattr(body, name) for name in SAMPLING if getattr(body, name, None) is not None}
    if isinstance(body, ChatCompletionRequest):
        if body.max_completion_tokens is not None:  # the newer name of the same limit
            params["max_tokens"] = body.max_completion_tokens
        # chat: logprobs is a flag, top_logprobs the count; the contract takes the count (or null)
        params.pop("logprobs", None)
        if body.logprobs:
            params["logprobs"] = body.top_logprobs or 0
    stop = params.get("stop")
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return params


def generation_row(endpoint: str, body: Mapping[str, Any] | BaseModel, row_id: Any, max_chars: int) -> dict[str, Any]:
    """One row of a generate job for a chat or text completion body (a
    mapping is parsed first): ``{"id", "messages" | "text", "params"}``."""
    chat = endpoint == "/v1/chat/completions"
    if not isinstance(body, BaseModel):
        body = parse(ChatCompletionRequest if chat else CompletionRequest, body)
    row: dict[str, Any] = {"id": row_id}
    if isinstance(body, ChatCompletionRequest):
        row["messages"] = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                            else "".join(p.text for p in m.content)} for m in body.messages]
        size = sum(len(m["content"]) for m in row["messages"])
    else:
        assert isinstance(body, CompletionRequest)
        row["text"] = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        size = len(row["text"])
    if size > max_chars:
        raise refuse(f"the {'messages' if chat else 'prompt'} hold {size} characters; the limit is {max_chars}",
                     "messages" if chat else "prompt")
    row["params"] = sampling_params(body)  # type: ignore[arg-type]
    return row


def output_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """The job options a row's ``params`` need: ``n`` above 1 and
    ``logprobs`` shape the job's output columns (a list of texts, a logprobs
    column), so a row may ask for them only where its job does."""
    options: dict[str, Any] = {}
    if isinstance(params.get("n"), int) and params["n"] > 1:
        options["n"] = params["n"]
    if params.get("logprobs") is not None:
        options["logprobs"] = params["logprobs"]
    return options


def stream_flags(body: ChatCompletionRequest | CompletionRequest) -> tuple[bool, bool]:
    """``stream``, and whether the stream ends with a usage chunk (``stream_options.include_usage``)."""
    stream = bool(body.stream)
    return stream, stream and body.stream_options is not None and bool(body.stream_options.include_usage)


# --- generate outputs -> OpenAI bodies

def _listed(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n if n == 1 else [value]


def _usage(output: Mapping[str, Any]) -> dict[str, int]:
    prompt, completion = int(output.get("prompt_tokens") or 0), int(output.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_body(model: str, output: Mapping[str, Any], created: int | None = None) -> dict[str, Any]:
    """A ``chat.completion`` from one output row (``text`` and
    ``finish_reason`` are lists when the row asked for ``n`` > 1)."""
    texts = _listed(output.get("text"), 1)
    reasons = _listed(output.get("finish_reason"), len(texts))
    logprobs = output.get("logprobs")
    if isinstance(logprobs, str):  # the generate task keeps them as JSON text (one Parquet type per column)
        logprobs = json.loads(logprobs)
    choices = [{"index": i, "message": {"role": "assistant", "content": text},
                "finish_reason": reasons[i] if i < len(reasons) else "stop",
                "logprobs": None if logprobs is None else {"content": _listed(logprobs, len(texts))[i]}}
               for i, text in enumerate(texts)]
    return {"id": completion_id("chatcmpl"), "object": "chat.completion", "created": created or int(time.time()),
            "model": model, "choices": choices, "usage": _usage(output)}


def completion_body(model: str, output: Mapping[str, Any], created: int | None = None) -> dict[str, Any]:
    """A ``text_completion`` from one output row."""
    texts = _listed(output.get("text"), 1)
    reasons = _listed(output.get("finish_reason"), len(texts))
    choices = [{"index": i, "text": text, "finish_reason": reasons[i] if i < len(reasons) else "stop",
                "logprobs": None} for i, text in enumerate(texts)]
    return {"id": completion_id("cmpl"), "object": "text_completion", "created": created or int(time.time()),
            "model": model, "choices": choices, "usage": _usage(output)}

