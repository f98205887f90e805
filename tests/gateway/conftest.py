"""Gateways served by uvicorn on loopback, on the session's real Redis and
real local Dask cluster."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gwtools import SECRET, auth, serve

from bitinglip.settings import Settings


@pytest.fixture(scope="session")
def gw_settings(redis_url: str, platform: Any, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        environment="test", redis_url=redis_url, scheduler_address=platform.client.scheduler.address,
        jwt_secret=SECRET, results_dir=tmp_path_factory.mktemp("results"),
        # the registry is a directory that the gateway and the workers share
        model_cache_dir=platform.settings.model_cache_dir, max_body_bytes=200_000,
        max_job_rows=5000, max_infer_rows=16, max_text_chars=2000,
        trusted_proxies=Settings().admin_allowlist[:1],  # 127.0.0.0/8 acts as a proxy here
        admin_allowlist=(*Settings().admin_allowlist, ipaddress.ip_network("198.51.100.0/24")),
    )


@pytest.fixture(scope="session")
def gateway(gw_settings: Settings) -> Iterator[str]:
    with serve(gw_settings) as url:
        yield url


@pytest.fixture(scope="session")
def admin(gateway: str) -> dict[str, str]:
    return auth("root", "admin jobs:read jobs:write")


@pytest.fixture(scope="session")
def models(gateway: str, admin: dict[str, str], tiny_encoder: Path, tiny_classifier: Path,
           tiny_gpt2: Path) -> dict[str, str]:
    """The tiny models, registered through the admin API."""
    names = {"tiny-encoder": tiny_encoder, "tiny-classifier": tiny_classifier, "tiny-gpt2": tiny_gpt2}
    for name, path in names.items():
        r = httpx.post(f"{gateway}/admin/models", headers=admin, timeout=60,
                       json={"name": name, "source": str(path), "task": name.split("-")[1].replace(
                           "encoder", "embed").replace("classifier", "classify").replace("gpt2", "generate")})
        assert r.status_code in (200, 201), r.text
    return {name: str(path) for name, path in names.items()}
