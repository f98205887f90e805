"""The result store on its own (no cluster): keys, tenants, crash leftovers, compaction, eviction."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bitinglip.atomic import temp_path
from bitinglip.platform.jobs import reuse
from bitinglip.platform.jobs.reuse import (
    KEY_COLUMN,
    ResultStore,
    default_reuse,
    evict,
    reusable_rows,
    row_key,
    space_of,
    store_frame,
)
from bitinglip.platform.tasks.generation import GenRow

OPTIONS = {"dtype": "float32", "normalize": None, "pooling": None, "matmul_precision": "auto"}
RUNTIME = {"matmul_precision": "highest", "max_length": 128}


def _space(**changes: object) -> str:
    parts = {"task": "embed", "model": "sha256:aaa", "options": OPTIONS, "runtime": RUNTIME, **changes}
    return space_of(parts["task"], parts["model"], parts["options"], parts["runtime"])  # type: ignore[arg-type]


def _vectors(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(8).astype(np.float32) for _ in range(n)]


def _save(store: ResultStore, texts: list[str], vectors: list[np.ndarray]) -> list[str]:
    keys = [row_key(store.space, t) for t in texts]
    store.save(store_frame(keys, [{"embedding": v} for v in vectors], [False] * len(texts), ("embedding",)))
    return keys


def test_every_part_of_the_key_changes_it() -> None:
    base = _space()
    assert base == _space()  # stable: the same job finds its rows again
    others = [_space(model="sha256:bbb"), _space(task="classify"), _space(options={**OPTIONS, "normalize": True}),
              _space(runtime={**RUNTIME, "matmul_precision": "medium"}), _space(runtime={**RUNTIME, "max_length": 64})]
    assert len({base, *others}) == 1 + len(others)
    assert row_key(base, "a cat sat") != row_key(base, "a cat sat.")  # one character
    assert row_key(base, "a cat sat") != row_key(others[0], "a cat sat")
    chat = GenRow(None, ({"role": "user", "content": "hi"},), {})
    assert row_key(base, chat) != row_key(base, GenRow(None, ({"role": "user", "content": "hi"},), {"seed": 1}))


def test_stored_rows_come_back_exactly_and_only_for_their_keys(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, "alice", _space(), 1 << 30)
    vectors = _vectors(5)
    keys = _save(store, [f"row {i}" for i in range(5)], vectors)
    found = store.lookup([*keys[:3], row_key(store.space, "row 0 ")])
    assert sorted(found) == sorted(keys[:3])
    for key, vector in zip(keys, vectors):
        if key in found:
            got = found[key]["embedding"]
            assert got.dtype == np.float32 and np.array_equal(got, vector) and found[key]["truncated"] is False


def test_tenants_and_spaces_never_see_each_others_rows(tmp_path: Path) -> None:
    space = _space()
    keys = _save(ResultStore(tmp_path, "alice", space, 1 << 30), ["shared text"], _vectors(1))
    assert ResultStore(tmp_path, "alice", space, 1 << 30).lookup(keys)
    assert ResultStore(tmp_path, "bob", space, 1 << 30).lookup(keys) == {}
    other = ResultStore(tmp_path, "alice", _space(model="sha256:bbb"), 1 << 30)
    assert other.lookup(keys) == {} and other.lookup([row_key(other.space, "shared text")]) == {}


def test_a_crashed_writers_leftover_is_never_read(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, "alice", _space(), 1 << 30)
    keys = _save(store, ["kept"], _vectors(1))
    (only,) = store._files()
    # a writer that died before its rename: the full file under its temporary (hidden) name
    leftover = Path(temp_path(store.folder / "next.parquet"))
    frame = store_frame([row_key(store.space, "never renamed")], [{"embedding": _vectors(1, 9)[0]}], [False],
                        ("embedding",))
    store._write(pa.Table.from_pandas(frame, preserve_index=False), leftover)  # whole, and of this space
    assert pq.read_table(leftover).num_rows == 1
    assert store.lookup([row_key(store.space, "never renamed")]) == {}
    assert store._files() == [only] and store.lookup(keys)


def test_a_truncated_file_is_a_miss_and_goes(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, "alice", _space(), 1 << 30)
    keys = _save(store, [f"row {i}" for i in range(50)], _vectors(50))
    (path,) = store._files()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short, a disk that filled mid-write
    assert store.lookup(keys) == {}
    assert not path.exists()  # never trusted again
    keys = _save(store, ["row 0"], _vectors(1))  # and the store goes on working
    assert store.lookup(keys)


def test_a_file_of_another_space_is_not_read(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, "alice", _space(), 1 << 30)
    other = ResultStore(tmp_path, "alice", _space(task="classify"), 1 << 30)
    keys = _save(other, ["row"], _vectors(1))
    (path,) = other._files()
    store.folder.mkdir(parents=True, exist_ok=True)
    os.replace(path, store.folder / path.name)  # moved by hand into the wrong folder
    assert store.lookup(keys) == {}


def test_many_small_files_are_compacted_into_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reuse, "COMPACT_FILES", 3)
    store = ResultStore(tmp_path, "alice", _space(), 1 << 30)
    keys, vectors = [], _vectors(5)
    for i in range(5):
        keys += _save(store, [f"row {i}", "row 0"], [vectors[i], vectors[0]])  # "row 0" stored again each time
    files = store._files()
    assert len(files) <= 3
    table = pq.read_table(files[0]) if len(files) == 1 else None
    if table is not None:
        assert sorted(table[KEY_COLUMN].to_pylist()) == sorted(set(keys))  # each key once
    found = store.lookup(keys)
    assert len(found) == 5 and all(np.array_equal(found[k]["embedding"], vectors[i]) for i, k in enumerate(keys[::2]))


def test_the_least_recently_used_files_go_past_the_cap(tmp_path: Path) -> None:
    big = ResultStore(tmp_path, "alice", _space(), 1 << 30)
    old_keys = _save(big, [f"old {i}" for i in range(20)], _vectors(20))
    used_keys = _save(big, [f"used {i}" for i in range(20)], _vectors(20, 1))
    old, used = sorted(big._files(), key=lambda p: p.stat().st_mtime)
    past = time.time() - 100
    os.utime(old, (past, past))
    os.utime(used, (past - 50, past - 50))
    assert big.lookup(used_keys[:1])  # a hit makes its file the most recently used
    size = used.stat().st_size
    stale = Path(temp_path(big.folder / "x.parquet"))
    stale.write_bytes(b"half")
    os.utime(stale, (past - 7200, past - 7200))
    evict(tmp_path, size)
    assert used.exists() and not old.exists() and not stale.exists()
    assert big.lookup(old_keys) == {} and len(big.lookup(used_keys)) == 20


def test_what_is_reused_by_default() -> None:
    assert default_reuse("embed", {}) and default_reuse("classify", {})
    assert default_reuse("generate", {"temperature": 0.0}) and default_reuse("generate", {"temperature": 0.8, "seed": 1})
    assert not default_reuse("generate", {"temperature": 0.8, "seed": None})
    assert not default_reuse("my-task", {})  # a user's task may not give the same output twice
    rows = [GenRow("a", None, {}), GenRow("b", None, {"temperature": 0.7}), GenRow("c", None, {"temperature": 0.7, "seed": 3})]
    assert reusable_rows("generate", {"temperature": 0.0, "seed": None}, rows) == [True, False, True]
