"""Fixtures of the model-manager tests: a fresh registry per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bitinglip.platform.models.registry import Registry
from bitinglip.settings import Settings

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(model_cache_dir=tmp_path / "cache")


@pytest.fixture
def registry(settings: Settings) -> Registry:
    return Registry(settings)
