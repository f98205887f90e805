"""Shared fixtures: a real Redis server, a real local Dask cluster with
worker processes, and tiny models saved to disk."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import free_port, start_redis
from tiny_models import make_tiny_classifier, make_tiny_encoder, make_tiny_gpt2


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
    from bitinglip.settings import Settings

    settings = Settings(model_cache_dir=tmp_path_factory.mktemp("cache"))
    with bitinglip.connect(settings=settings, n_workers=2, dashboard_address=":0") as p:
        yield p
