"""The gateway application: a list of routes, a list of middleware, one
table of error handlers.

::

    from bitinglip.gateway.app import create_app
    app = create_app(Settings.from_env())     # serve with uvicorn
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from bitinglip.gateway.handlers import EXCEPTION_HANDLERS
from bitinglip.gateway.middleware import BodyLimit, BodyTimeout, RequestContext, UnexpectedErrors
from bitinglip.gateway.openapi import document
from bitinglip.gateway.routes import (
    health,
    infer,
    jobs,
    models,
    openai_batches,
    openai_files,
    openai_online,
    openai_responses,
    results,
    resume,
)
from bitinglip.gateway.state import Gateway
from bitinglip.settings import Settings, get_settings


async def openapi(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, None)
    return gw.json(request, document())


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request, None)
    text = gw.metrics.render(await gw.store.counts())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4",
                             headers=getattr(request.state, "ratelimit", {}))


ROUTES = [
    Route("/health", health.health),
    Route("/health/live", health.live),
    Route("/health/ready", health.ready),
    Route("/openapi.json", openapi),
    Route("/metrics", metrics),
    Route("/v1/models", models.list_models),
    Route("/v1/models/{name:path}", models.get_model),
    Route("/v1/jobs", jobs.submit_job, methods=["POST"]),
    Route("/v1/jobs", jobs.list_jobs, methods=["GET"]),
    Route("/v1/jobs/{job_id}", jobs.get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}", jobs.cancel_job, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}/resume", resume.resume_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}/results", results.job_results),
    Route("/v1/jobs/{job_id}/results/files", results.result_files),
    Route("/v1/jobs/{job_id}/results/files/{name}", results.result_file),
    Route("/v1/jobs/{job_id}/events", jobs.job_events),
    Route("/v1/infer", infer.infer, methods=["POST"]),
    Route("/v1/files", openai_files.create_file, methods=["POST"]),
    Route("/v1/files", openai_files.list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", openai_files.get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", openai_files.delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", openai_files.file_content, methods=["GET"]),
    Route("/v1/batches", openai_batches.create_batch, methods=["POST"]),
    Route("/v1/batches", openai_batches.list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", openai_batches.get_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", openai_batches.cancel_batch, methods=["POST"]),
    Route("/v1/embeddings", openai_online.embeddings, methods=["POST"]),
    Route("/v1/chat/completions", openai_online.chat_completions, methods=["POST"]),
    Route("/v1/completions", openai_online.completions, methods=["POST"]),
    Route("/v1/responses", openai_responses.create_response, methods=["POST"]),
    Route("/admin/models", models.admin_list_models, methods=["GET"]),
    Route("/admin/models", models.admin_register_model, methods=["POST"]),
    Route("/admin/models/{name:path}", models.admin_remove_model, methods=["DELETE"]),
    Route("/admin/jobs", jobs.admin_list_jobs),
]


#: bytes an upload's multipart framing (boundaries, part headers, the purpose field) may add to its file
MULTIPART_SLACK = 64 * 1024


def create_app(settings: Settings | None = None, tls: bool = False) -> Starlette:
    """A gateway app; Redis and the cluster connect when its lifespan starts."""
    settings = settings or get_settings()
    gateway = Gateway(settings, tls=tls)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = Starlette(
        routes=ROUTES,
        # first: everything after it (the admin allowlist, uvicorn's access log) sees the caller behind a
        # trusted proxy in request.client, the rightmost X-Forwarded-For hop that is not a trusted proxy
        middleware=[Middleware(ProxyHeadersMiddleware, trusted_hosts=[str(n) for n in settings.trusted_proxies]),
                    Middleware(RequestContext, metrics=gateway.metrics), Middleware(UnexpectedErrors),
                    # a batch file may be far larger than a JSON body; its upload checks the file's own size
                    Middleware(BodyLimit, max_bytes=gateway.settings.max_body_bytes,
                               overrides={"/v1/files": gateway.settings.batch_max_bytes + MULTIPART_SLACK}),
                    Middleware(BodyTimeout, timeout_s=gateway.settings.body_timeout_s)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app

