"""The status plugin's close ends its Redis writer, on a real Redis.

redis-py 8.2's asyncio client can lose a cancel that lands while a command
waits for its answer: the command returns and the task goes on.  The writer
looped until cancelled, so such a close never ended and the scheduler's close
waited on it (tests/ops/test_jobs_page.py stalled 60 s in full runs; alone,
the scheduler closed in a moment)."""

from __future__ import annotations

import asyncio
import random

from bitinglip.platform.ops.status_plugin import RedisStatusPlugin

#: start-close cycles; a lost cancel showed in about 1 of 8 before the fix, with a writer that is nearly always
#: inside a command (interval 1 ms)
CYCLES = 60
#: far beyond a close's few milliseconds: reaching it means the close is stuck
CLOSE_DEADLINE_S = 10


def test_close_ends_the_writer_even_when_redis_py_loses_the_cancel(redis_url: str) -> None:
    rng = random.Random(7)

    async def cycles() -> list[int]:
        stuck = []
        for cycle in range(CYCLES):
            plugin = RedisStatusPlugin(redis_url, 60, interval_s=0.001)
            await plugin.start(None)
            await asyncio.sleep(rng.uniform(0, 0.02))  # the close lands anywhere in the writer's loop
            closing = asyncio.ensure_future(plugin.close())
            done, _ = await asyncio.wait([closing], timeout=CLOSE_DEADLINE_S)
            if not done:
                stuck.append(cycle)
                closing.cancel()  # a second cancel reaches the writer: leave nothing running
                await asyncio.wait([closing], timeout=CLOSE_DEADLINE_S)
                break
            closing.result()
        return stuck

    assert asyncio.run(cycles()) == [], "the plugin's close waited on its writer"
