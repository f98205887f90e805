"""The platform on a cluster started the production way: `dask scheduler`
and `bitinglip worker` (which wraps `dask worker`) as separate processes."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import kill_processes, start_dask_processes


def _wait_for_workers(address: str, n: int, timeout: float = 120) -> None:
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(n, timeout=timeout)


@pytest.fixture
def scheduler_and_workers(tmp_path: Path) -> Iterator[str]:
    address, procs = start_dask_processes(
        tmp_path, "bitinglip-worker", workers=[sys.executable, "-m", "bitinglip", "worker", "ADDRESS", "--nworkers", "2",
                                               "--gpus", "0"])
    try:
        _wait_for_workers(address, 2)
        yield address
    finally:
        kill_processes(procs, signal.SIGTERM)


def test_a_job_runs_on_workers_started_by_bitinglip_worker(scheduler_and_workers: str) -> None:
    import bitinglip

    with bitinglip.connect(scheduler_and_workers) as platform:
        threads = platform.client.run(lambda: __import__("torch").get_num_threads())
        df = platform.submit("embed", model="all-MiniLM-L6-v2", inputs=[f"row {i}" for i in range(200)],
                             partition_rows=50).result()
        workers_used = {ts for ts in platform.client.run(
            lambda dask_worker: bool(dask_worker.plugins["bitinglip-models"].resident())).values()}
    assert len(threads) == 2
    assert set(threads.values()) == {max(1, len(os.sched_getaffinity(0)) // 2)}
    assert df["id"].tolist() == list(range(200))
    assert workers_used == {True}  # the plugin reached both workers and both took work
