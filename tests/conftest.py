"""Shared fixtures: a real Redis server, a real local Dask cluster with
worker processes, and tiny models saved to disk."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import make_tiny_classifier, make_tiny_encoder, make_tiny_gpt2  # noqa: E402


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


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port for the whole session."""
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_classifier(models_dir: Path) -> Path:
    return make_tiny_classifier(models_dir / "tiny-classifier")


@pytest.fixture(scope="session")
def tiny_encoder(models_dir: Path) -> Path:
    return make_tiny_encoder(models_dir / "tiny-encoder")


@pytest.fixture(scope="session")
def tiny_gpt2(models_dir: Path) -> Path:
    return make_tiny_gpt2(models_dir / "tiny-gpt2")


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One embedded cluster (2 worker processes) shared by the integration tests."""
    import bitinglip
    from bitinglip.platform.settings import Settings

    settings = Settings(model_cache_dir=tmp_path_factory.mktemp("cache"))
    with bitinglip.connect(settings=settings, n_workers=2, dashboard_address=":0") as p:
        yield p


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
    procs = [subprocess.Popen(scheduler, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=open(log_dir / f"scheduler-{tag}.log", "w"))]
    time.sleep(1)
    worker = ([str(bindir / "dask"), "worker", address, "--nworkers", str(nworkers), "--nthreads", "1"]
              if workers is None else [address if w == "ADDRESS" else w for w in workers])
    procs.append(subprocess.Popen(worker, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=open(log_dir / f"workers-{tag}.log", "w")))
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
