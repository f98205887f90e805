"""Rate limits per token subject, counted in Redis so that every gateway
instance shares them.

The ``limits`` package's moving window on its Redis storage: a request is
allowed when fewer than ``count`` were allowed in the last ``period_s``.
Unlike fixed windows this never lets ``2 x count`` through around a window edge.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from bitinglip import redis_keys as keys
from bitinglip.errors import RateLimitedError
from bitinglip.settings import Rate, Settings

WRITE, READ, INFER = "write", "read", "infer"
#: every bucket, the one list that the limiter's rates and the exported 429 counters are built from
RATE_BUCKETS = (WRITE, READ, INFER)


def bucket_rates(settings: Settings) -> dict[str, Rate]:
    """Each bucket's rate from the settings."""
    return dict(zip(RATE_BUCKETS, (settings.rate_limit, settings.read_rate_limit, settings.infer_rate_limit)))


@dataclass(frozen=True)
class Verdict:
    limit: int
    remaining: int
    reset_s: int
    #: the request's bucket, subject and time of counting, for :meth:`RateLimiter.refund` (0: nothing to give back)
    bucket: str = ""
    subject: str = ""
    at: float = 0.0

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(self.reset_s)}


class RateLimiter:
    def __init__(self, redis: Any, rates: dict[str, Rate]) -> None:
        self.rates = rates
        self.redis = redis
        # the gateway's own connection pool; keys: <rate_prefix>:<bucket>/<subject>/<count>/<period>/second
        self._storage = RedisStorage("async+redis://", implementation="redispy", key_prefix=keys.rate_prefix(),
                                     connection_pool=redis.connection_pool)
        self._window = MovingWindowRateLimiter(self._storage)
        # whole seconds: the settings' periods are a second, minute, hour or day
        self._items = {bucket: RateLimitItemPerSecond(rate.count, int(rate.period_s), namespace=bucket)
                       for bucket, rate in rates.items()}

    async def hit(self, bucket: str, subject: str) -> Verdict:
        """Count one request; raise :class:`RateLimitedError` when over."""
        rate, item = self.rates[bucket], self._items[bucket]
        at = time.time()
        allowed = await self._window.hit(item, subject)
        # a second round trip: the moving window's hit answers only yes or no
        reset_at, remaining = await self._window.get_window_stats(item, subject)
        reset = max(1, math.ceil(reset_at - time.time()))
        verdict = Verdict(rate.count, max(0, remaining), reset, bucket, subject, at if allowed else 0.0)
        if not allowed:
            raise RateLimitedError(f"rate limit of {rate.count} {bucket} requests per {rate.period_s:g}s reached; "
                                   f"retry in {reset}s", retry_after=reset,
                                   headers={**verdict.headers(), "Retry-After": str(reset)})
        return verdict

    async def refund(self, verdict: Verdict) -> None:
        """Give back a request that was refused as invalid: a caller's
        mistakes must not use up what the limit allows them."""
        item = self._items.get(verdict.bucket)
        if not verdict.at or item is None or time.time() - verdict.at >= item.get_expiry():
            return  # nothing counted, or its entry has left the window: popping would free a slot still in use
        # limits removes no single entry.  Its moving window is a Redis list of one subject's request times,
        # newest first: popping the newest gives back one slot (the entries left free theirs at most this
        # request's duration sooner); test_rate_limit_refund_and_two_gateways fails if that layout changes
        await self.redis.lpop(self._storage.bridge.prefixed_key(item.key_for(verdict.subject)))
