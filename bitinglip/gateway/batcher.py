"""The infer batcher: requests for the same task, model and options that
arrive within ``wait_s`` of each other go to the cluster as one task
(:func:`bitinglip.platform.jobs.predict_texts`), at a Dask priority above
every bulk job, so they start before queued partitions.  Should a merged
batch fail, each of its requests runs again alone, so only the bad one fails.
Once every request of a batch has gone (its client disconnected, see
:mod:`bitinglip.gateway.routes.openai_online`) or the wait timed out, the
batch's Dask future is cancelled, and the worker aborts its engine requests
(:func:`bitinglip.platform.jobs.runner.abandon_tick`).

It knows nothing of HTTP: :mod:`bitinglip.gateway.state` builds one per
gateway, and ``POST /v1/infer`` (:mod:`bitinglip.gateway.routes.infer`) feeds it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from bitinglip.errors import BitingLipError, JobFailedError, UnavailableError
from bitinglip.platform.jobs import predict_texts
from bitinglip.settings import Settings

#: Dask priority of infer batches: above every bulk job's (the API allows 1 to 10), which is all it has to be;
#: a constant, since no value a deployment could pick would change the order
INFER_PRIORITY = 100


@dataclass
class _Batch:
    texts: list[str] = field(default_factory=list)
    requests: int = 0
    #: requests still waiting for the result; at 0 nobody will read it
    waiting: int = 0
    fired: bool = False
    future: Any = None
    result: asyncio.Future[list[dict[str, Any]]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(self, client: Any, wait_s: float, max_rows: int,
                 timeout_s: float = Settings.model_fields["infer_timeout_s"].default) -> None:
        self.client = client
        self.wait_s = wait_s
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self._open: dict[tuple[str, str, str, Callable[..., Any], str], _Batch] = {}

    async def infer(self, task: str, model: str, options: Mapping[str, Any], texts: list[str],
                    fn: Callable[..., Any] = predict_texts, group: str = "") -> tuple[list[dict[str, Any]], int]:
        """Outputs for ``texts`` and how many requests shared their batch.
        ``fn`` is what runs on a worker (:func:`predict_texts`, or another
        function with its arguments, e.g. one that also counts tokens);
        only requests for the same ``fn`` and ``group`` share a batch (the
        gateway gives generation its tenant as the group: a tenant whose
        clients all left must not keep its requests running inside another
        tenant's task; the engine batches both anyway)."""
        key = (task, model, json.dumps(options, sort_keys=True), fn, group)
        batch = self._open.get(key)
        if batch is None or len(batch.texts) + len(texts) > self.max_rows:
            batch = _Batch()
            self._open[key] = batch
            asyncio.get_running_loop().call_later(self.wait_s, self._fire, key, batch)
        start = len(batch.texts)
        batch.texts += texts
        batch.requests += 1
        batch.waiting += 1
        if len(batch.texts) >= self.max_rows:
            self._fire(key, batch)
        try:
            outputs = await asyncio.shield(batch.result)
        except asyncio.CancelledError:  # the caller went away
            batch.waiting -= 1
            if batch.waiting == 0 and batch.fired:
                batch.result.cancel()
                if batch.future is not None:
                    batch.future.cancel()
            raise
        except BitingLipError as exc:
            if batch.requests == 1 or isinstance(exc, UnavailableError):
                raise
            # the failure may be another request's: run this one alone
            return await self._alone(task, model, json.loads(key[2]), texts, fn), 1
        return outputs[start:start + len(texts)], batch.requests

    async def _alone(self, task: str, model: str, options: dict[str, Any], texts: list[str],
                     fn: Callable[..., Any]) -> list[dict[str, Any]]:
        batch = _Batch(texts=list(texts), requests=1, waiting=1, fired=True)
        run = asyncio.ensure_future(self._run(batch, task, model, options, fn))
        try:
            await asyncio.shield(run)
        except asyncio.CancelledError:
            batch.result.cancel()
            if batch.future is not None:
                batch.future.cancel()
            raise
        return await batch.result

    def _fire(self, key: tuple[str, str, str, Callable[..., Any], str], batch: _Batch) -> None:
        if batch.fired:
            return
        batch.fired = True
        if self._open.get(key) is batch:
            del self._open[key]
        if batch.waiting == 0:  # every caller left before it was sent
            batch.result.cancel()
            return
        task, model, options, fn, _ = key
        asyncio.get_running_loop().create_task(self._run(batch, task, model, json.loads(options), fn))

    async def _run(self, batch: _Batch, task: str, model: str, options: dict[str, Any],
                   fn: Callable[..., Any]) -> None:
        if batch.result.done():  # every caller left before it was sent
            return
        future = batch.future = self.client.submit(fn, task, model, options, batch.texts, pure=False,
                                                   priority=INFER_PRIORITY)
        try:
            with anyio.fail_after(self.timeout_s):
                result = await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except TimeoutError:
            future.cancel()  # the worker aborts its engine requests (runner.abandon_tick)
            error: BaseException = UnavailableError(f"inference took over {self.timeout_s:g}s")
        except BitingLipError as exc:  # handed to every waiting request
            error = exc
        except Exception as exc:  # noqa: BLE001 - a failure on the cluster, not in the gateway
            error = JobFailedError(f"inference failed: {type(exc).__name__}: {exc}")
        else:
            if not batch.result.done():  # done: cancelled, every caller left
                batch.result.set_result(result)
            return
        if not batch.result.done():
            batch.result.set_exception(error)
