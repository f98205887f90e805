"""The one REST submit sequence (issue 22): a job's figures reach its Redis
record even when Redis lost the record during the hand-over, and every route
that hands a job over goes through :func:`bitinglip.gateway.handover.submit`."""

from __future__ import annotations

import inspect
import time
import uuid
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

pytest.importorskip("starlette", reason="the gateway extra is not installed")

from bitinglip.gateway import handover
from bitinglip.gateway.routes import jobs, openai_batches, resume
from bitinglip.platform.jobs import MISSING, JobState, JobStore


def _record(job_id: str) -> dict[str, Any]:
    now = time.time()
    return {"id": job_id, "owner": "handover", "state": JobState.QUEUED.value, "task": "embed", "model": "m",
            "priority": 5, "output": "/nowhere", "options": {}, "created_at": now, "updated_at": now}


class _PluginWritesFirst(JobStore):
    """Redis loses the record while the job is handed over, and the job's
    first status (written by the scheduler plugin) lands just before the
    gateway writes the record back."""

    async def transition(self, job_id: str, state: str | None, fields: Any = None, now: float | None = None) -> str:
        outcome = await super().transition(job_id, state, fields, now)
        if outcome == MISSING:
            await super().restore({"id": job_id, "owner": "handover", "state": JobState.RUNNING.value,
                                   "started_at": time.time()})
        return outcome


@pytest.mark.parametrize("store_type", [JobStore, _PluginWritesFirst])
def test_the_figures_reach_a_record_that_redis_lost(redis_url: str, store_type: type[JobStore]) -> None:
    async def body() -> dict[str, Any] | None:
        r = aioredis.from_url(redis_url, decode_responses=True)
        store = store_type(r, 3600)
        job_id = uuid.uuid4().hex
        record = _record(job_id)
        assert await store.restore(record)
        await r.delete(f"bitinglip:v1:job:{job_id}")  # Redis lost it
        await handover.record_figures(store, job_id, record, {"rows_total": 7, "parts": 2, "model": "m"})
        got = await store.get(job_id)
        await r.aclose()
        return got

    got = anyio.run(body)
    assert got is not None
    assert (int(got["rows_total"]), int(got["parts"]), got["model"]) == (7, 2, "m")


@pytest.mark.parametrize("module", [jobs, openai_batches, resume], ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_route_hands_jobs_over_through_one_sequence(module: Any) -> None:
    source = inspect.getsource(module)
    assert "await submit(" in source
    for private in ("hand_over", "store.restore(", "refusal("):  # the sequence's own steps
        assert private not in source, f"{module.__name__} repeats {private} of handover.submit"
