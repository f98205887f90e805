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


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path, tiny_encoder: Path) -> None:
    """`bitinglip models show NAME | head`: the pipe closes before the output is written."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MODEL_CACHE_DIR": str(tmp_path / "cache")}
    add = subprocess.run([sys.executable, "-m", "bitinglip", "models", "add", "enc", str(tiny_encoder), "--task",
                          "embed"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert add.returncode == 0, add.stderr
    read, write = os.pipe()
    os.close(read)  # the reader has gone before a byte is written
    proc = subprocess.run([sys.executable, "-m", "bitinglip", "models", "show", "enc"], env=env, stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    os.close(write)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
