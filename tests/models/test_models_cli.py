"""``bitinglip models ...`` end to end in this process, on real files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from model_helpers import flip_byte

from bitinglip.cli import main
from bitinglip.settings import get_settings


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    yield tmp_path / "cache"
    get_settings.cache_clear()


def test_add_list_show_verify_remove(cache: Path, tiny_encoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "add", "enc", str(tiny_encoder), "--task", "embed", "--actor", "ops"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert (added["name"], added["version"], added["added_by"]) == ("enc", "1", "ops")
    assert main(["models", "list", "--json"]) == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["enc"]
    assert main(["models", "list"]) == 0
    assert "enc@1" in capsys.readouterr().out
    assert main(["models", "show", "enc@1"]) == 0
    assert "model.safetensors" in json.loads(capsys.readouterr().out)["files"]
    assert main(["models", "verify", "enc"]) == 0
    flip_byte(cache / "enc" / "1" / "model.safetensors")
    assert main(["models", "verify", "enc"]) == 1
    assert "'model.safetensors'" in capsys.readouterr().err
    assert main(["models", "add", "../../etc", str(tiny_encoder), "--task", "embed"]) == 1
    assert "invalid model name" in capsys.readouterr().err
    assert main(["models", "remove", "enc"]) == 0
    assert "removed enc@1" in capsys.readouterr().out
    assert main(["models", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
