"""The infer batcher: requests for the same task, model and options that
arrive within ``wait_s`` of each other go to the cluster as one task
(:func:`bitinglip.platform.jobs.predict_texts`), at a Dask priority above
every bulk job, so they start before queued partitions.  Should a merged
batch fail, each of its requests runs again alone, so only the bad one fails.

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

#: Dask priority of infer batches; bulk jobs use 1 to 10
INFER_PRIORITY = 100
INFER_TIMEOUT_S = 120.0


@dataclass
class _Batch:
    texts: list[str] = field(default_factory=list)
    requests: int = 0
    fired: bool = False
    result: asyncio.Future[list[dict[str, Any]]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(self, client: Any, wait_s: float, max_rows: int) -> None:
        self.client = client
        self.wait_s = wait_s
        self.max_rows = max_rows
        self._open: dict[tuple[str, str, str, Callable[..., Any]], _Batch] = {}

    async def infer(self, task: str, model: str, options: Mapping[str, Any], texts: list[str],
                    fn: Callable[..., Any] = predict_texts) -> tuple[list[dict[str, Any]], int]:
        """Outputs for ``texts`` and how many requests shared their batch.
        ``fn`` is what runs on a worker (:func:`predict_texts`, or another
        function with its arguments, e.g. one that also counts tokens);
        only requests for the same ``fn`` share a batch."""
        key = (task, model, json.dumps(options, sort_keys=True), fn)
        batch = self._open.get(key)
        if batch is None or len(batch.texts) + len(texts) > self.max_rows:
            batch = _Batch()
            self._open[key] = batch
            asyncio.get_running_loop().call_later(self.wait_s, self._fire, key, batch)
        start = len(batch.texts)
        batch.texts += texts
        batch.requests += 1
        if len(batch.texts) >= self.max_rows:
            self._fire(key, batch)
        try:
            outputs = await asyncio.shield(batch.result)
        except BitingLipError as exc:
            if batch.requests == 1 or isinstance(exc, UnavailableError):
                raise
            # the failure may be another request's: run this one alone
            return await self._alone(task, model, json.loads(key[2]), texts, fn), 1
        return outputs[start:start + len(texts)], batch.requests

    async def _alone(self, task: str, model: str, options: dict[str, Any], texts: list[str],
                     fn: Callable[..., Any]) -> list[dict[str, Any]]:
        batch = _Batch(texts=list(texts), requests=1, fired=True)
        await self._run(batch, task, model, options, fn)
        return await batch.result

    def _fire(self, key: tuple[str, str, str, Callable[..., Any]], batch: _Batch) -> None:
        if batch.fired:
            return
        batch.fired = True
        if self._open.get(key) is batch:
            del self._open[key]
        task, model, options, fn = key
        asyncio.get_running_loop().create_task(self._run(batch, task, model, json.loads(options), fn))

    async def _run(self, batch: _Batch, task: str, model: str, options: dict[str, Any],
                   fn: Callable[..., Any]) -> None:
        future = self.client.submit(fn, task, model, options, batch.texts, pure=False,
                                    priority=INFER_PRIORITY)
        try:
            with anyio.fail_after(INFER_TIMEOUT_S):
                result = await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except TimeoutError:
            future.cancel()
            batch.result.set_exception(UnavailableError(f"inference took over {INFER_TIMEOUT_S:g}s"))
        except BitingLipError as exc:  # handed to every waiting request
            batch.result.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - a failure on the cluster, not in the gateway
            batch.result.set_exception(JobFailedError(f"inference failed: {type(exc).__name__}: {exc}"))
        else:
            batch.result.set_result(result)
