"""Each manager package's public API (its ``__init__``), which the gateway, the
CLI and ``bitinglip`` itself import from (contract ``public-api`` in pyproject.toml)."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from bitinglip.errors import InputError, UnknownModelError
from bitinglip.platform.models import PACKAGED_MODELS, catalogue, resolve_listed
from bitinglip.settings import Settings

PACKAGES = ["bitinglip.platform.tasks", "bitinglip.platform.models", "bitinglip.platform.jobs",
            "bitinglip.platform.cluster", "bitinglip.platform.ops"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_is_there(name: str) -> None:
    package = importlib.import_module(name)
    assert package.__all__
    missing = [n for n in package.__all__ if not hasattr(package, n)]
    assert not missing


def test_the_gateway_imports_no_torch() -> None:
    """The packages' ``__init__``s stay cheap: a gateway process never loads torch or transformers."""
    code = ("import sys, bitinglip.gateway.app, bitinglip.platform.tasks, bitinglip.platform.models; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_catalogue_lists_packaged_models(tmp_path: Path) -> None:
    found = catalogue(Settings(model_cache_dir=tmp_path))
    assert set(found) == set(PACKAGED_MODELS)
    assert {e["source_kind"] for e in found.values()} == {"package"}


def test_resolve_listed_takes_packaged_names_and_refuses_paths(tmp_path: Path) -> None:
    settings = Settings(model_cache_dir=tmp_path)
    assert resolve_listed("all-MiniLM-L6-v2", settings) == "all-MiniLM-L6-v2"
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text("{}")
    for name in ("local", str(tmp_path / "local"), "no-such-model@1"):
        with pytest.raises(UnknownModelError, match="neither packaged nor registered"):
            resolve_listed(name, settings)
    for name in (None, "", 3):
        with pytest.raises(InputError, match="non-empty string"):
            resolve_listed(name, settings)
