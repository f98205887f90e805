"""A streamed chat or text completion as OpenAI's chunks (pure: no HTTP).

Chat: a ``chat.completion.chunk`` per piece of text (the first of each
choice carries the role), one with the ``finish_reason`` per choice, and with
``stream_options.include_usage`` a last one with ``usage`` and no choices
(every other chunk then has ``usage: null``, as OpenAI sends it).  Text
completions stream ``text_completion`` objects, as OpenAI streams them.

The end is made from the whole answer: whatever of a choice's text the
pieces did not carry goes out before its finish, so the chunks always add up
to the answer the same request gets unstreamed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from bitinglip.gateway.openai.shapes import completion_id

log = logging.getLogger(__name__)


class Chunks:
    """The chunks of one streamed completion, in order; ``text`` keeps what each choice was sent."""

    def __init__(self, endpoint: str, model: str, include_usage: bool, created: int | None = None) -> None:
        self.chat = endpoint == "/v1/chat/completions"
        self.base: dict[str, Any] = {
            "id": completion_id("chatcmpl" if self.chat else "cmpl"),
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created or int(time.time()), "model": model}
        if include_usage:
            self.base["usage"] = None
        self.include_usage = include_usage
        self.sent: dict[int, str] = {}

    def opening(self, n: int) -> list[dict[str, Any]]:
        """What goes out before any text: a chat's role, per choice."""
        if not self.chat:
            return []
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]

    def text(self, index: int, text: str) -> dict[str, Any]:
        """A piece of choice ``index``'s text, following what it was sent."""
        self.sent[index] = self.sent.get(index, "") + text
        return self._chunk(index, {"content": text} if self.chat else text)

    def closing(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The end, from the whole answer (a ``chat.completion`` or ``text_completion`` body): each
        choice's text the pieces did not carry, its finish, then the usage where asked."""
        chunks = []
        for choice in body["choices"]:
            i = choice["index"]
            whole = choice["message"]["content"] if self.chat else choice["text"]
            sent = self.sent.get(i, "")
            if whole.startswith(sent):
                rest = whole[len(sent):]
            else:  # cannot be taken back: said, so a client's odd text can be traced
                log.warning("choice %d of streamed %s went out as %r, which the answer %r does not start with",
                            i, self.base["id"], sent[-80:], whole[:80])
                rest = ""
            if rest:
                chunks.append(self.text(i, rest))
            if self.chat:
                chunks.append(self._chunk(i, {}, choice["finish_reason"], choice.get("logprobs")))
            else:
                chunks.append(self._chunk(i, "", choice["finish_reason"]))
        if self.include_usage:
            chunks.append({**self.base, "choices": [], "usage": body["usage"]})
        return chunks

    def _chunk(self, index: int, piece: Any, finish_reason: str | None = None,
               logprobs: Any = None) -> dict[str, Any]:
        key = "delta" if self.chat else "text"
        return {**self.base, "choices": [{"index": index, key: piece, "logprobs": logprobs,
                                          "finish_reason": finish_reason}]}
