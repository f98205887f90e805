"""Per-tenant caps on online generation in flight, so that one token
subject cannot fill the workers' engines and starve everyone else.

Two figures per tenant (token subject), held while a chat or text completion
waits for its answer: the generation work it asked for, ``n x max_tokens``
(what an engine must be ready to produce for it), and how many of its
requests carry a ``json_schema`` (each is a grammar to compile: a 44 kB
schema took about 33 s of a worker's CPU).  A request that would take a
tenant over either cap is refused at once with 429; one that alone exceeds
the token cap can never run and is a 400 naming the setting.

Counted in this gateway process (the event loop is its only writer): a
tenant spread over several gateways gets the caps once per gateway.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from bitinglip.errors import InputError, RateLimitedError

#: what a 429 here asks the client to wait: in-flight work ends within seconds to minutes, not on a clock
RETRY_AFTER_S = 1


class InFlight:
    """The caps of one gateway: ``max_tokens`` of ``n x max_tokens`` and
    ``max_grammars`` json_schema requests per tenant at once."""

    def __init__(self, max_tokens: int, max_grammars: int) -> None:
        if max_tokens < 1 or max_grammars < 1:
            raise ValueError("the per-tenant caps must be at least 1")
        self.max_tokens = max_tokens
        self.max_grammars = max_grammars
        self._tokens: Counter[str] = Counter()
        self._grammars: Counter[str] = Counter()

    @contextmanager
    def hold(self, tenant: str, tokens: int, grammar: bool) -> Iterator[None]:
        """Count ``tokens`` (and a grammar) for ``tenant`` until the block ends."""
        if tokens > self.max_tokens:
            raise InputError(f"this request's n x max_tokens (over its rows) is {tokens}; this gateway runs at "
                             f"most {self.max_tokens} per tenant at once (BITINGLIP_TENANT_GENERATION_TOKENS): "
                             "lower n or max_tokens")
        if self._tokens[tenant] + tokens > self.max_tokens:
            raise _busy(f"your online generation in flight holds {self._tokens[tenant]} of n x max_tokens; this "
                        f"request's {tokens} would pass the per-tenant limit of {self.max_tokens} "
                        "(BITINGLIP_TENANT_GENERATION_TOKENS): retry when one of your requests has answered")
        if grammar and self._grammars[tenant] >= self.max_grammars:
            raise _busy(f"{self._grammars[tenant]} of your requests with a json_schema response format are in "
                        f"flight, the per-tenant limit (BITINGLIP_TENANT_GRAMMARS); retry when one has answered")
        self._tokens[tenant] += tokens
        self._grammars[tenant] += int(grammar)
        try:
            yield
        finally:
            self._tokens[tenant] -= tokens
            self._grammars[tenant] -= int(grammar)
            for counts in (self._tokens, self._grammars):  # the counters hold only the tenants in flight
                if counts[tenant] <= 0:
                    del counts[tenant]

    def held(self, tenant: str) -> tuple[int, int]:
        """``tenant``'s tokens and grammars in flight."""
        return self._tokens[tenant], self._grammars[tenant]


def generation_work(rows: int, params: Mapping[str, Any]) -> tuple[int, bool]:
    """What ``rows`` generation rows of checked ``params`` hold of the caps:
    their ``n x max_tokens``, and whether they compile a json_schema."""
    fmt = params.get("response_format") or {}
    return rows * int(params.get("n", 1)) * int(params["max_tokens"]), fmt.get("type") == "json_schema"


def _busy(message: str) -> RateLimitedError:
    return RateLimitedError(message, retry_after=RETRY_AFTER_S, headers={"Retry-After": str(RETRY_AFTER_S)})
