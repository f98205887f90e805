"""Atomic writes: the target is old or new, never half, and no temporary file stays."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bitinglip.atomic import TEMP_MARK, temp_path, write_atomically, write_json_atomically


def test_temp_path_is_hidden_beside_the_target_and_unique(tmp_path: Path) -> None:
    target = tmp_path / "part-00001.parquet"
    first, second = temp_path(target), temp_path(str(target))
    assert first != second
    assert os.path.dirname(first) == str(tmp_path)
    assert os.path.basename(first).startswith(".part-00001.parquet" + TEMP_MARK + str(os.getpid()))


def test_json_replaces_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text('{"old": true}')
    write_json_atomically(target, {"new": [1, 2]}, indent=1)
    assert json.loads(target.read_text()) == {"new": [1, 2]}
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")

    def half(tmp: str) -> None:
        Path(tmp).write_text("ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(target, half)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["record.json"]
    with pytest.raises(TypeError):  # not JSON: the same, for write_json_atomically
        write_json_atomically(target, {"x": object()})
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["record.json"]
