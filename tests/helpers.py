"""Helpers the tests share: free ports, a real redis-server, Dask started
the production way. (Test modules import this, never ``conftest``: with
several conftest.py files, ``from helpers import`` finds whichever loaded
first.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not on PATH: install it (apt-get install redis-server); .ci/run does")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(data_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"redis-server did not start on port {port}")


def start_dask_processes(log_dir: Path, tag: str, workers: list[str] | None = None,
                         nworkers: int = 2) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """`dask scheduler` and workers as separate processes, the production way.

    ``workers`` is the worker command, with ``"ADDRESS"`` where the
    scheduler's address goes (default: `dask worker ADDRESS --nworkers N
    --nthreads 1`); each process leads its own session,
    so :func:`kill_processes` takes its children down too."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    scheduler = [str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                 "--dashboard-address", ":0"]
    # the child keeps its own copy of the log's descriptor: ours closes once it has started
    with open(log_dir / f"scheduler-{tag}.log", "w") as log:
        procs = [subprocess.Popen(scheduler, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log)]
    time.sleep(1)
    worker = ([str(bindir / "dask"), "worker", address, "--nworkers", str(nworkers), "--nthreads", "1"]
              if workers is None else [address if w == "ADDRESS" else w for w in workers])
    with open(log_dir / f"workers-{tag}.log", "w") as log:
        procs.append(subprocess.Popen(worker, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log))
    return address, procs


def kill_processes(procs: list[subprocess.Popen[bytes]], sig: int = 9) -> None:
    import signal

    for proc in reversed(procs):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Clock:
    """A fake timer for the load-time calibrations: it stands still until a :class:`TimedTask` runs a
    micro-batch, which moves it by what ``cost(batch)`` says that micro-batch takes."""

    def __init__(self, cost: Any) -> None:
        self.cost, self.now, self.runs = cost, 0.0, 0

    def __call__(self) -> float:
        return self.now


def timed_task(clock: Clock) -> Any:
    """A task whose every micro-batch costs what ``clock.cost`` says, in ``clock``'s time."""
    from bitinglip.platform.tasks.base import Loaded, TaskType

    class Timed(TaskType):
        name = "timed"
        columns = ("x",)

        def load(self, path, device, options):  # type: ignore[no-untyped-def]
            return Loaded(None)

        def predict(self, loaded, batch, options):  # type: ignore[no-untyped-def]
            clock.now += clock.cost(batch)
            clock.runs += 1
            return [{"x": 0}] * len(batch.ids)

    return Timed()
