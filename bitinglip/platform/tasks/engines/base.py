"""The interface every generation engine implements, and what goes in and out.

A partition hands its rows to :meth:`Engine.run` all at once and blocks
there; the engine interleaves them with the requests of every other
partition on the worker.  ``tick(done)`` is called from the partition's own
thread as its requests finish (and every fraction of a second while none
does); when it raises (a cancelled job, a deadline) the engine aborts that
call's unfinished requests, and only those, and the exception propagates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

#: true while a gateway's online request runs (``runner._on_engine``): its rows go to the engine at once and
#: never wait in a prefix sweep behind bulk rows (``GenRequest.grouped``)
ONLINE: ContextVar[bool] = ContextVar("bitinglip_online", default=False)

#: called with the number of this call's requests finished so far; may raise to stop the call
TickFn = Callable[[int], None]
#: called with a completion's index and its new text as the engine produces it (a streamed request)
TextFn = Callable[[int, str], None]


@dataclass(frozen=True)
class GenRequest:
    """One row: the prompt's token ids (the chat template already applied)
    and its sampling parameters, checked (``generation.check_params``):
    ``max_tokens``, ``temperature``, ``top_p``, ``top_k`` (0: none),
    ``min_p``, ``repetition_penalty``, ``presence_penalty``,
    ``frequency_penalty``, ``stop`` (tuple of strings), ``seed`` (None: the
    engine's), ``n``, ``logprobs`` (None or top-k per token),
    ``response_format`` (None or OpenAI's dict), ``ignore_eos``.

    ``on_text``: where a streamed request's text goes as it grows, from the
    engine's own thread (so it must not block): each call carries text that
    follows what the earlier calls for that completion carried.  What it
    holds back (a possible stop string's start, a character whose bytes are
    not all out) comes only in the result, which stays the whole answer.

    ``grouped``: the row may wait in the engine for rows of other partitions
    that share its prompt's prefix (a batch row of a job with
    ``prefix_order``; :mod:`.prefix_sweep`); an online request never waits."""

    prompt_ids: list[int]
    params: Mapping[str, Any] = field(default_factory=dict)
    on_text: TextFn | None = field(default=None, compare=False)
    grouped: bool = field(default=False, compare=False)


@dataclass
class GenResult:
    """What one request produced: ``n`` texts and why each ended
    (``"stop"``: EOS or a stop string; ``"length"``: ``max_tokens``)."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int  # over all n completions
    #: per completion, per token: {"token", "logprob", "top_logprobs": [{"token", "logprob"}]}
    logprobs: list[list[dict[str, Any]]] | None = None


class Engine(ABC):
    """A generation engine; thread-safe: any number of partitions call
    :meth:`run` at once."""

    #: "vllm" or "transformers"
    name: str = ""

    @abstractmethod
    def run(self, requests: list[GenRequest], tick: TickFn) -> list[GenResult | Exception]:
        """Results in the order of ``requests``; a request the engine refused
        (its prompt too long, a schema it cannot compile) gives its exception
        in its place and the others go on."""

    @abstractmethod
    def nbytes(self) -> int:
        """Memory the engine holds: weights plus its KV cache (for the
        worker's residency budget)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Abort what runs, free the weights and the cache; idempotent."""

    @property
    def broken(self) -> bool:
        """The engine cannot run requests any more (its loop died); the model
        plugin then starts a new one in its place."""
        return False

    @property
    def failure(self) -> str | None:
        """Why the engine is :attr:`broken` (None while it is not)."""
        return None

    def stats(self) -> dict[str, float]:
        """Figures for metrics: ``kv_cache_usage`` (0..1), ``running``, ``waiting``, ``generated_tokens`` (all
        so far, where the engine counts them)."""
        return {}
