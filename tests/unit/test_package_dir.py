"""A model shipped as a Python package is found the same way by name and as a source."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from bitinglip.platform.models import names
from bitinglip.platform.models.sources import package_dir


@pytest.mark.parametrize("style", ["MODEL_DIR", "get_model_path"])
def test_a_packaged_model_resolves_through_package_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       style: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    module = types.ModuleType("fake_packaged_model")
    if style == "MODEL_DIR":
        module.MODEL_DIR = str(tmp_path)  # type: ignore[attr-defined]
    else:
        module.get_model_path = lambda: str(tmp_path)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_packaged_model", module)
    monkeypatch.setitem(names.PACKAGED_MODELS, "fake-model", "fake_packaged_model")
    assert package_dir("fake_packaged_model") == tmp_path
    assert names.resolve_model("fake-model").path == str(tmp_path)
