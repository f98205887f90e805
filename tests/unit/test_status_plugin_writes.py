"""The status plugin's writer against the scheduler's hooks, on a real Redis.

A hook that moves a job on while the writer's last state is on its way to
Redis must not be lost.  A 2-row REST job went queued -> running ->
succeeded within one write interval: the writer sent "running", the
manifest task ended during that round trip, and the writer took the job for
written as succeeded and dropped it.  Redis kept "running" (rows 2 of 2) for
ever (``tests/gateway/test_tenants.py`` failed in about 1 CI run in 3; a
loop of its scenario caught it in the act: the scheduler held none of the
job's tasks and Redis still said "running" 120 s on).  Here the hook lands
inside the write, every time."""

from __future__ import annotations

import asyncio
from typing import Any

from bitinglip import redis_keys as keys
from bitinglip.platform.jobs.vocabulary import PROGRESS_TOPIC
from bitinglip.platform.ops.status_plugin import ANNOTATION, RedisStatusPlugin

JOB = "f" * 32
#: no writer loop of its own: the test calls the writer itself, so nothing interleaves but the hook it places
NO_LOOP_S = 3600.0


def _key(part: int | str) -> str:
    return f"bitinglip-{JOB}-{part}"


def test_a_job_that_ends_while_its_running_state_is_written_ends_in_redis(redis_url: str) -> None:
    async def scenario() -> dict[str, Any]:
        plugin = RedisStatusPlugin(redis_url, 60, interval_s=NO_LOOP_S)
        await plugin.start(None)
        try:
            store = plugin._store
            await store.redis.delete(keys.job(JOB))  # a rerun starts from no record
            _, created = await store.create(JOB, "tenant", {"task": "embed", "parts": 1, "rows_total": 2})
            assert created
            plugin.update_graph(None, annotations={ANNOTATION: {_key(p): {"id": JOB} for p in (0, "manifest")}})
            plugin.transition(_key(0), "waiting", "processing")
            plugin.log_event(PROGRESS_TOPIC, {"job": JOB, "part": 0, "done": 2, "total": 2})
            write = store.transition_and_get

            async def manifest_ends_meanwhile(*args: Any, **kwargs: Any) -> Any:
                answer = await write(*args, **kwargs)  # Redis has "running" now
                plugin.transition(_key(0), "processing", "memory")
                plugin.transition(_key("manifest"), "processing", "memory")
                return answer

            store.transition_and_get = manifest_ends_meanwhile  # type: ignore[method-assign]
            await plugin._flush()
            assert (await store.get(JOB) or {}).get("state") == "running"  # what the first write said
            store.transition_and_get = write  # type: ignore[method-assign]
            await plugin._flush()  # the next interval
            return await store.get(JOB) or {}
        finally:
            await plugin.close()

    record = asyncio.run(scenario())
    assert record.get("state") == "succeeded", record
    assert record.get("finished_at") and int(record.get("rows_done") or 0) == 2, record
