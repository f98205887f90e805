"""The platform on a cluster started the production way: `dask scheduler`
and `bitinglip worker` (which wraps `dask worker`) as separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port


def _wait_for_workers(address: str, n: int, timeout: float = 120) -> None:
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(n, timeout=timeout)


@pytest.fixture
def scheduler_and_workers(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "scheduler.log", "w"))]
    time.sleep(1)
    procs.append(subprocess.Popen([sys.executable, "-m", "bitinglip", "worker", address, "--nworkers", "2",
                                   "--gpus", "0"], env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "w")))
    try:
        _wait_for_workers(address, 2)
        yield address
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


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
