"""Shared fixtures: a real Redis server, a real local Dask cluster with
worker processes, and tiny models saved to disk."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# every generation engine the tests start (workers inherit this) takes a 256 MiB KV cache, not a CPU
# worker's default 1 GiB: many clusters live at once in the suite, and the machine has 24 GiB
os.environ.setdefault("BITINGLIP_KV_CACHE_BYTES", str(256 << 20))

from helpers import free_port, start_redis
from tiny_models import make_tiny_classifier, make_tiny_encoder, make_tiny_gpt2

#: fixtures that start a Dask cluster, a gateway server or a stack of processes (here and in the packages'
#: conftest.py and test files), and the ones that start a Redis server: a test that uses one, directly or
#: through another fixture, gets the marker, so `make test-fast` leaves it out without a list to keep up.
#: A test that starts a cluster in its own body carries ``@pytest.mark.cluster`` itself.
CLUSTER_FIXTURES = frozenset({"platform", "own_platform", "cluster", "gateway", "gw_settings", "stack", "deployment",
                              "scheduler_and_workers"})
REDIS_FIXTURES = frozenset({"redis_url", "redis_server"})


#: how long pytest may take to exit once its session is over before the watchdog dumps every thread's stack and
#: exits 1: a thread or child left running (a generation engine's loop, say) would otherwise hold CI until its
#: own deadline, long after the summary line
EXIT_WATCHDOG_S = 120


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail a run that leaves a non-daemon thread behind (the interpreter would wait for it forever), naming it."""
    deadline = time.monotonic() + 15
    while (left := _non_daemon_threads()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        frames = sys._current_frames()
        sys.stderr.write(f"\nERROR: the tests left {len(left)} non-daemon thread(s) running; their stacks:\n")
        for thread in left:
            frame = frames.get(thread.ident or 0)
            sys.stderr.write(f"--- {thread.name}\n" + ("".join(traceback.format_stack(frame)) if frame else ""))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _non_daemon_threads() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if not t.daemon and t is not main and t.is_alive()]


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.dump_traceback_later(EXIT_WATCHDOG_S, exit=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)
        if used & REDIS_FIXTURES:
            item.add_marker(pytest.mark.redis)


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
def smollm2_added(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """``bitinglip models add smollm2 FILE.gguf --task generate --max-length 2048`` into a model cache of its
    own, as a user runs it, once per session (the dequantization takes about 30 s): the manifest summary it
    printed, and the cache.  ``--max-length``: the tests' engines take a 256 MiB KV cache, short of the
    model's 8192 positions.  The modules that use it only read the cache."""
    import json
    import subprocess

    from real_models import smollm2_gguf

    cache = tmp_path_factory.mktemp("smollm2-cache")
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"MODEL_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "bitinglip", "models", "add", "smollm2", str(smollm2_gguf()),
                           "--task", "generate", "--max-length", "2048"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), cache


@pytest.fixture(scope="session")
def smollm2_greedy(smollm2_added: tuple[dict[str, Any], Path]) -> list[str]:
    """transformers' own greedy answers to ``real_models.CHATS`` (``GREEDY_TOKENS`` new tokens each) on the
    added SmolLM2: the reference that both real-model modules compare with, computed once per session."""
    from real_models import CHATS, GREEDY_TOKENS, greedy_answers

    summary, cache = smollm2_added
    return greedy_answers(cache / "smollm2" / summary["version"], CHATS, GREEDY_TOKENS)


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One embedded cluster (2 worker processes) shared by the integration tests."""
    import bitinglip
    from bitinglip.settings import Settings

    settings = Settings(model_cache_dir=tmp_path_factory.mktemp("cache"))
    with bitinglip.connect(settings=settings, n_workers=2, dashboard_address=":0") as p:
        yield p
