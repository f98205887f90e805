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

from bitinglip.gateway.openai.bodies import ResponseRequest, TextConfig, check_metadata
from bitinglip.gateway.schemas import parse

RESPONSES_ENDPOINT = "/v1/responses"
__all__ = ["RESPONSES_ENDPOINT", "chat_request", "check_metadata", "response_body", "response_format"]


def response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """``text.format`` as the chat path's ``response_format``: the Responses
    API writes ``{"type": "json_schema", "name", "schema", "strict"}`` flat,
    chat nests it under ``json_schema``."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    return {"type": "json_schema", "json_schema": fmt.model_dump(by_alias=True, exclude_unset=True,
                                                                 exclude={"type"})}


def chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body a Responses body stands for (checked
    and turned into a row by :func:`~.shapes.generation_row`)."""
    req = parse(ResponseRequest, body)
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else [
        {"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
        for m in req.input]
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + items
    chat: dict[str, Any] = {"model": req.model, "messages": messages, "n": 1}
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if getattr(req, theirs) is not None:
            chat[ours] = getattr(req, theirs)
    fmt = response_format(req.text)
    if fmt is not None:
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
