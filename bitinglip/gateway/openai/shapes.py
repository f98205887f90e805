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

from bitinglip.errors import InputError
from bitinglip.gateway.schemas import (
    CHAT_REQUEST,
    COMPLETION_REQUEST,
    EMBEDDING_REQUEST,
    MAX_DIMENSIONS,
    MAX_EMBEDDING_INPUTS,
    SAMPLING,
)
from bitinglip.platform.tasks import MAX_MESSAGES, ROLES, texts_or_error

#: the BitingLip task behind each OpenAI endpoint
ENDPOINTS = {"/v1/embeddings": "embed", "/v1/chat/completions": "generate", "/v1/completions": "generate",
             "/v1/responses": "generate"}

#: the fields each body takes: the request bodies' own (:mod:`bitinglip.gateway.schemas`)
EMBEDDING_FIELDS = frozenset(EMBEDDING_REQUEST.fields)
CHAT_FIELDS = frozenset(CHAT_REQUEST.fields)
COMPLETION_FIELDS = frozenset(COMPLETION_REQUEST.fields)


def refuse(message: str, param: str | None = None) -> InputError:
    """An :class:`InputError` naming the field it is about (OpenAI's ``param``)."""
    exc = InputError(message)
    exc.param = param  # type: ignore[attr-defined]  # read by the gateway's error handler
    return exc


def check_fields(body: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:  # OpenAI too refuses arguments it does not know, rather than ignore a typo
        raise refuse(f"unknown field {', '.join(unknown)} for {what}; fields are {', '.join(sorted(allowed))}",
                     unknown[0])
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise refuse("model must be a model name (GET /v1/models lists them)", "model")


# --- embeddings

def embedding_texts(body: Mapping[str, Any], max_chars: int) -> list[str]:
    """The texts of an embeddings body: ``input`` is one string, or a list of
    them (one embedding each, in order)."""
    check_fields(body, EMBEDDING_FIELDS, "/v1/embeddings")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise refuse("input must be a string or a non-empty list of strings (token arrays are not taken)", "input")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise refuse(f"input has {len(texts)} items; the limit is {MAX_EMBEDDING_INPUTS}", "input")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise refuse(f"input[{i}] has {len(text)} characters; the limit is {max_chars}", "input")
    try:
        texts_or_error(texts, [f"input[{i}]" for i in range(len(texts))])  # e.g. a lone surrogate
    except InputError as exc:
        raise refuse(str(exc), "input") from None
    return texts


def embedding_format(body: Mapping[str, Any]) -> tuple[str, int | None]:
    """``encoding_format`` (float or base64) and ``dimensions`` (None: all)."""
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise refuse("encoding_format must be float or base64", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= MAX_DIMENSIONS):
        raise refuse("dimensions must be a whole number from 1 up to the model's size", "dimensions")
    return fmt, dims


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

def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw or len(raw) > MAX_MESSAGES:
        raise refuse(f"messages must be a non-empty list of at most {MAX_MESSAGES} messages", "messages")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in ROLES:
            raise refuse(f"messages[{i}] must be an object with a role ({', '.join(sorted(ROLES))})", "messages")
        content = message.get("content")
        if isinstance(content, list):  # text parts only: [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise refuse(f"messages[{i}].content: only text parts are taken", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise refuse(f"messages[{i}].content must be a string", "messages")
        out.append({"role": message["role"], "content": content})
    return out


def sampling_params(body: Mapping[str, Any], chat: bool) -> dict[str, Any]:
    """The row's ``params``: the body's sampling options under the contract's
    names.  Their bounds are the generate task's to check (per model); here
    only the names and the OpenAI spellings are settled."""
    params = {name: body[name] for name in SAMPLING if body.get(name) is not None}
    if chat and body.get("max_completion_tokens") is not None:  # the newer name of the same limit
        params["max_tokens"] = body["max_completion_tokens"]
    logprobs = body.get("logprobs")
    if chat:  # chat: logprobs is a flag, top_logprobs the count; the contract takes the count (or null)
        params.pop("logprobs", None)
        if logprobs is True:
            params["logprobs"] = int(body.get("top_logprobs") or 0)
        elif logprobs not in (None, False):
            raise refuse("logprobs must be true or false", "logprobs")
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    return params


def generation_row(endpoint: str, body: Mapping[str, Any], row_id: Any, max_chars: int) -> dict[str, Any]:
    """One row of a generate job for a chat or text completion body:
    ``{"id", "messages" | "text", "params"}``."""
    chat = endpoint == "/v1/chat/completions"
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, endpoint)
    row: dict[str, Any] = {"id": row_id}
    if chat:
        row["messages"] = _messages(body.get("messages"))
        size = sum(len(m["content"]) for m in row["messages"])
    else:
        for name, default in (("echo", False), ("suffix", None), ("best_of", 1)):  # taken only at their defaults
            if body.get(name, default) not in (default, None):
                raise refuse(f"{name}={body[name]!r:.40} is not served; leave it out", name)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise refuse("prompt must be a string (one prompt per request)", "prompt")
        row["text"], size = prompt, len(prompt)
    if size > max_chars:
        raise refuse(f"the {'messages' if chat else 'prompt'} hold {size} characters; the limit is {max_chars}",
                     "messages" if chat else "prompt")
    row["params"] = sampling_params(body, chat)
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


def stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``stream``, and whether the stream ends with a usage chunk (``stream_options.include_usage``)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise refuse("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
        raise refuse("stream_options takes include_usage only", "stream_options")
    return stream, bool(options.get("include_usage")) and stream


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

