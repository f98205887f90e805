"""Rate limits per token subject, counted in Redis so that every gateway
instance shares them.

A sliding log: each bucket is a sorted set of request times; a request is
allowed when fewer than ``count`` fall within the last ``period_s``.  Unlike
fixed windows this never lets ``2 x count`` through around a window edge.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bitinglip import redis_keys as keys
from bitinglip.errors import RateLimitedError
from bitinglip.settings import Rate, Settings

WRITE, READ, INFER = "write", "read", "infer"
#: every bucket, the one list that the limiter's rates and the exported 429 counters are built from
RATE_BUCKETS = (WRITE, READ, INFER)


def bucket_rates(settings: Settings) -> dict[str, Rate]:
    """Each bucket's rate from the settings."""
    return dict(zip(RATE_BUCKETS, (settings.rate_limit, settings.read_rate_limit, settings.infer_rate_limit)))

# KEYS: the bucket. ARGV: now (s), period (s), count, member.
# Returns {allowed 0/1, requests in the window, oldest time in the window}.
_HIT = """
local now, period, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
local used = redis.call('ZCARD', KEYS[1])
local allowed = 0
if used < count then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  used = used + 1
  allowed = 1
end
redis.call('PEXPIRE', KEYS[1], math.ceil(period * 1000))
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {allowed, used, oldest[2] or ARGV[1]}
"""


@dataclass(frozen=True)
class Verdict:
    limit: int
    remaining: int
    reset_s: int
    #: the request's entry in its bucket, for :meth:`RateLimiter.refund`
    bucket: str = ""
    subject: str = ""
    member: str = ""

    def headers(self) -> dict[str, str]:
        return {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
                "X-RateLimit-Reset": str(self.reset_s)}


class RateLimiter:
    def __init__(self, redis: Any, rates: dict[str, Rate]) -> None:
        self.rates = rates
        self.redis = redis
        self._hit = redis.register_script(_HIT)

    async def hit(self, bucket: str, subject: str) -> Verdict:
        """Count one request; raise :class:`RateLimitedError` when over."""
        rate = self.rates[bucket]
        now = time.time()
        member = f"{now}:{uuid.uuid4().hex[:8]}"
        allowed, used, oldest = await self._hit(keys=[keys.rate(bucket, subject)],
                                                args=[now, rate.period_s, rate.count, member])
        reset = max(1, math.ceil(float(oldest) + rate.period_s - now))
        verdict = Verdict(rate.count, max(0, rate.count - int(used)), reset, bucket, subject, member)
        if not int(allowed):
            raise RateLimitedError(f"rate limit of {rate.count} {bucket} requests per {rate.period_s:g}s reached; "
                                   f"retry in {reset}s", retry_after=reset,
                                   headers={**verdict.headers(), "Retry-After": str(reset)})
        return verdict

    async def refund(self, verdict: Verdict) -> None:
        """Give back a request that was refused as invalid: a caller's
        mistakes must not use up what the limit allows them."""
        if verdict.member:
            await self.redis.zrem(keys.rate(verdict.bucket, verdict.subject), verdict.member)
