"""OpenAI's Responses API (``POST /v1/responses``, online and as a batch
line's ``url``) on the chat generation path: a request becomes one chat row
of the generation row contract, and the row's output becomes OpenAI's
``Response`` object.

``input`` is a string (one user message) or a list of messages (``role``
user, assistant, system or developer; ``content`` a string or a list of
``input_text``/``output_text`` parts); ``instructions`` goes first as a
system message, as OpenAI places it.  ``max_output_tokens``,
``temperature``, ``top_p`` and ``text.format`` (``text``, ``json_object``,
or ``json_schema`` with ``name``, ``schema``, ``strict``) are taken;
tools, reasoning, conversations and ``previous_response_id`` are not (a
clear 400 names the field).  Nothing is stored: ``store`` is taken and
ignored, and there is no ``GET /v1/responses/{id}``.  Pure functions, as
:mod:`.shapes`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from bitinglip.gateway.openai.shapes import check_fields, refuse

RESPONSES_ENDPOINT = "/v1/responses"
RESPONSE_FIELDS = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text",
                             "metadata", "user", "store", "stream"})
_INPUT_ROLES = frozenset({"user", "assistant", "system", "developer"})
_PART_TYPES = frozenset({"input_text", "output_text", "text"})
#: OpenAI's bounds on ``metadata`` (Batch and Response alike)
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


def check_metadata(metadata: Any, param: str = "metadata") -> dict[str, str] | None:
    """``metadata`` within OpenAI's limits (16 pairs, keys up to 64
    characters, values up to 512, all strings); the error names the key."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise refuse(f"{param} must be an object of string pairs", param)
    if len(metadata) > METADATA_PAIRS:
        raise refuse(f"{param} has {len(metadata)} pairs; the limit is {METADATA_PAIRS}", param)
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS:
            raise refuse(f"{param} key {key[:40]!r}... has {len(key)} characters; the limit is "
                         f"{METADATA_KEY_CHARS}", param)
        if not isinstance(value, str):
            raise refuse(f"{param}[{key!r}] must be a string, got {type(value).__name__}", param)
        if len(value) > METADATA_VALUE_CHARS:
            raise refuse(f"{param}[{key!r}] has {len(value)} characters; the limit is {METADATA_VALUE_CHARS}", param)
    return metadata


def _content(raw: Any, where: str) -> str:
    if isinstance(raw, str):
        return raw
    # a string before the set lookup: {"type": {}} is unhashable, and was a 500
    if isinstance(raw, list) and all(isinstance(p, dict) and isinstance(p.get("type"), str) and p["type"] in _PART_TYPES
                                     and isinstance(p.get("text"), str) for p in raw):
        return "".join(p["text"] for p in raw)
    raise refuse(f"{where}.content must be a string or a list of input_text parts (images, files and audio are "
                 "not taken)", "input")


def _input_messages(raw: Any) -> list[dict[str, str]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise refuse("input must be a string or a non-empty list of messages", "input")
    out = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise refuse(f"{where} must be a message ({{\"role\", \"content\"}}); other item types (tool calls, "
                         "reasoning) are not taken", "input")
        if not isinstance(item.get("role"), str) or item["role"] not in _INPUT_ROLES:
            raise refuse(f"{where}.role must be one of {', '.join(sorted(_INPUT_ROLES))}", "input")
        out.append({"role": item["role"], "content": _content(item.get("content"), where)})
    return out


def response_format(text: Any) -> dict[str, Any] | None:
    """``text.format`` as the chat path's ``response_format``: the Responses
    API writes ``{"type": "json_schema", "name", "schema", "strict"}`` flat,
    chat nests it under ``json_schema``."""
    if text is None:
        return None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise refuse('text must be {"format": {...}}', "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise refuse('text.format.type must be text, json_object or json_schema', "text.format")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    if not isinstance(fmt.get("schema"), dict):
        raise refuse("text.format.schema must be a JSON schema (an object)", "text.format.schema")
    if not isinstance(fmt.get("name"), str) or not fmt["name"]:
        raise refuse("text.format.name is required for a json_schema format (a string)", "text.format.name")
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                   if k in fmt}}


def chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body a Responses body stands for (checked
    and turned into a row by :func:`~.shapes.generation_row`)."""
    check_fields(body, RESPONSE_FIELDS, RESPONSES_ENDPOINT)
    if body.get("stream", False) is not False:
        raise refuse("stream is not served on /v1/responses; leave it out (chat completions stream)", "stream")
    check_metadata(body.get("metadata"))
    for name, kind, word in (("user", str, "a string"), ("store", bool, "true or false")):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise refuse(f"{name} must be {word}", name)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise refuse("instructions must be a string", "instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + \
        _input_messages(body.get("input"))
    chat: dict[str, Any] = {"model": body["model"], "messages": messages, "n": 1}
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if body.get(theirs) is not None:
            chat[ours] = body[theirs]
    fmt = response_format(body.get("text"))
    if fmt is not None and fmt["type"] != "text":
        chat["response_format"] = fmt
    return chat


def response_body(model: str, output: Mapping[str, Any], body: Mapping[str, Any],
                  created: float | None = None) -> dict[str, Any]:
    """OpenAI's ``Response`` object from one output row of the chat that
    :func:`chat_request` made of ``body``."""
    texts = output.get("text")
    text = texts[0] if isinstance(texts, (list, tuple)) else texts
    reasons = output.get("finish_reason")
    reason = reasons[0] if isinstance(reasons, (list, tuple)) else reasons
    whole = reason != "length"
    prompt, completion = int(output.get("prompt_tokens") or 0), int(output.get("completion_tokens") or 0)
    now = time.time()
    fmt = (body.get("text") or {}).get("format") or {"type": "text"}
    return {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(created or now),
        "status": "completed" if whole else "incomplete", "completed_at": int(now) if whole else None,
        "error": None, "incomplete_details": None if whole else {"reason": "max_output_tokens"},
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": model, "metadata": body.get("metadata") or {},
        "output": [{"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
                    "status": "completed" if whole else "incomplete",
                    "content": [{"type": "output_text", "text": text or "", "annotations": [], "logprobs": []}]}],
        "parallel_tool_calls": False, "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "tool_choice": "none", "tools": [], "text": {"format": fmt}, "store": False, "user": body.get("user"),
        "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": completion,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion},
    }
