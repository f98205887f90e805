"""What one gateway process holds: settings, Redis, the cluster connection,
the infer batcher, and the per-request checks every route goes through (token,
scope, address, rate limit; the caller's own job; a model it may name)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from typing import Any

import anyio
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from bitinglip.errors import ConfigError, ForbiddenError, NotFoundError, RateLimitedError, UnknownModelError
from bitinglip.gateway import rebuild
from bitinglip.gateway.auth import Principal, TokenVerifier, mint, verifier
from bitinglip.gateway.batcher import Batcher
from bitinglip.gateway.metrics import Metrics
from bitinglip.gateway.openai.files import FileStore
from bitinglip.gateway.ratelimit import READ, RateLimiter, bucket_rates
from bitinglip.gateway.streams import TokenStreams
from bitinglip.gateway.tenants import InFlight
from bitinglip.platform.jobs import JOB_ID, JobStore
from bitinglip.platform.models import PACKAGED_MODELS, resolve_listed
from bitinglip.settings import Settings

log = logging.getLogger("bitinglip.gateway")

#: seconds between sweeps for expired files (reading or listing one deletes it sooner)
FILE_SWEEP_S = 60.0


class Gateway:
    """Built by :func:`bitinglip.gateway.app.create_app`; started and stopped
    by the app's lifespan."""

    def __init__(self, settings: Settings, tls: bool = False) -> None:
        if not settings.redis_url:
            raise ConfigError("the gateway needs REDIS_URL (job status and rate limits live in Redis)")
        self.settings = settings
        self.tls = tls
        self.verifier: TokenVerifier
        self.verifier, generated = verifier(settings)
        if generated:
            token = mint(settings, "dev", ["jobs:read", "jobs:write", "admin"],
                         ttl_s=min(86400, settings.jwt_max_ttl_s))
            log.warning("no BITINGLIP_JWT_SECRET: using a development key; a token for 'dev' (all scopes, 24h):\n%s",
                        token)
        if settings.environment == "production" and not tls:
            log.warning("ENVIRONMENT=production without TLS: tokens travel in clear text "
                        "(use --ssl-certfile/--ssl-keyfile or a TLS-terminating proxy)")
        self.metrics = Metrics()
        self.in_flight = InFlight(settings.tenant_generation_tokens, settings.tenant_grammars)
        self.redis: Any = None
        self.store: JobStore
        self.limiter: RateLimiter
        self.platform: Any = None
        self.batcher: Any = None
        self.streams: TokenStreams
        self.submissions: anyio.CapacityLimiter
        self._watch: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import redis.asyncio as aioredis

        # submissions talk to the scheduler and write files: their own threads,
        # so that reads (on anyio's default pool) never wait behind them
        self.submissions = anyio.CapacityLimiter(self.settings.submit_threads)
        # a request beyond the pool waits briefly for a connection rather than failing
        pool = aioredis.BlockingConnectionPool.from_url(
            self.settings.redis_url, max_connections=self.settings.redis_max_connections,
            timeout=self.settings.redis_pool_timeout_s, decode_responses=True,
            socket_timeout=10, socket_connect_timeout=5)
        self.redis = aioredis.Redis.from_pool(pool)
        self.store = JobStore(self.redis, self.settings.job_ttl_s)
        self.limiter = RateLimiter(self.redis, bucket_rates(self.settings))
        os.makedirs(self.settings.results_dir, exist_ok=True)
        os.makedirs(self.settings.model_cache_dir, exist_ok=True)
        self.platform = await anyio.to_thread.run_sync(self._connect)
        self.batcher = Batcher(self.platform.client, self.settings.infer_batch_ms / 1000.0,
                               max_rows=4 * self.settings.max_infer_rows, timeout_s=self.settings.infer_timeout_s)
        self.streams = TokenStreams(self.platform.client)
        self._watch = asyncio.create_task(rebuild.watch(self.store, self.settings.results_dir, self.platform))
        self._sweep = asyncio.create_task(self._sweep_files())

    async def _sweep_files(self) -> None:
        files = FileStore(self.redis, self.settings.results_dir)
        while True:
            try:
                if deleted := await files.sweep():
                    log.info("deleted %d expired file(s)", deleted)
            except Exception:  # Redis away: the next round
                log.warning("cannot sweep expired files; retrying in %.0f s", FILE_SWEEP_S, exc_info=True)
            await asyncio.sleep(FILE_SWEEP_S)

    def _connect(self) -> Any:
        import bitinglip
        from bitinglip.platform.ops import RedisStatusPlugin

        platform = bitinglip.connect(self.settings.scheduler_address, settings=self.settings)
        assert self.settings.redis_url is not None
        platform.client.register_plugin(RedisStatusPlugin(self.settings.redis_url, self.settings.job_ttl_s))
        return platform

    async def stop(self) -> None:
        for task in (self._watch, self._sweep):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.platform is not None:
            await anyio.to_thread.run_sync(self.platform.close)
        if self.redis is not None:
            await self.redis.aclose()

    async def authorize(self, conn: HTTPConnection, scope: str | None, bucket: str = READ) -> Principal:
        """The caller, once its token, scope, address (for ``admin``) and rate
        limit pass; raises the matching domain error otherwise."""
        principal = self.verifier.decode(conn.headers.get("authorization"))
        if scope is not None:
            principal.require(scope)
        if scope == "admin":
            self._check_allowlist(conn)
        try:
            verdict = await self.limiter.hit(bucket, principal.sub)
        except RateLimitedError:
            self.metrics.rejected(bucket)
            raise
        conn.state.ratelimit = verdict.headers()
        conn.state.rate_verdict = verdict  # refunded if the request turns out invalid before its work runs
        return principal

    def _check_allowlist(self, conn: HTTPConnection) -> None:
        # conn.client is the caller: behind a trusted proxy, the address that uvicorn's
        # ProxyHeadersMiddleware (app.py) took from X-Forwarded-For
        try:
            address = ipaddress.ip_address(conn.client.host) if conn.client else None
        except ValueError:
            address = None
        if address is None or not any(address in net for net in self.settings.admin_allowlist):
            raise ForbiddenError(f"admin routes are not open to {address or 'this address'}")

    @staticmethod
    def charge(conn: HTTPConnection) -> None:
        """The request's work goes to the cluster now: it counts against the
        rate limit even if it then fails (a refund is for work never done)."""
        conn.state.rate_verdict = None

    def json(self, conn: HTTPConnection, body: Any, status: int = 200, headers: dict[str, str] | None = None
             ) -> JSONResponse:
        """A JSON response carrying the caller's rate-limit headers."""
        return JSONResponse(body, status_code=status,
                            headers={**getattr(conn.state, "ratelimit", {}), **(headers or {})})

    async def own_job(self, principal: Principal, job_id: str) -> dict[str, Any]:
        """The caller's job; someone else's is as absent as a missing one."""
        job = await self.store.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None or job.get("owner") != principal.sub:
            raise NotFoundError(f"no job {job_id!r}")
        return job

    async def listed_model(self, name: Any) -> str:
        """The model reference to hand the cluster: a packaged or registered
        model (``name@version`` pins a registry version); unknown names and
        paths are refused."""
        if isinstance(name, str) and name in PACKAGED_MODELS:
            return name  # no registry read, no thread: the common case of /v1/infer
        try:
            return await anyio.to_thread.run_sync(resolve_listed, name, self.settings)
        except UnknownModelError:
            raise UnknownModelError(f"unknown model {name!r}; GET /v1/models lists the models you can use") from None
