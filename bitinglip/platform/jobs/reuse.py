"""Result reuse: a row computed once is not computed again by a later job of the same tenant.

A row's result is keyed by a hash of everything that decides it: the model's
weights (a registered version's sha256, else the folder's files), the task,
the job's options, the choices the loaded model runs with (engine, matmul
precision, its token limit), and the row itself (text, or messages and
per-row params).  Results live as Parquet under ``BITINGLIP_REUSE_DIR`` (default
``MODEL_CACHE_DIR/.bitinglip/results``)::

    <tenant hash>/<space hash>/<uuid>.parquet

where a *space* is one (model, task, options, runtime) and each file holds
rows ``key`` + the task's output columns + ``truncated``.  The tenant is part
of the path, so one tenant's lookups never open another's files.

Files are written under a hidden temporary name and renamed into place
(:mod:`bitinglip.atomic`), so a crash mid-write leaves only a hidden
leftover that no reader lists; a file that does not read back whole (a
truncated copy, a full disk) is a miss and is removed.  A space with many
small files is compacted into one; past ``BITINGLIP_REUSE_MAX_BYTES`` the
least recently used files go (a hit touches its file).  No server: the
workers share the folder, as they share the models beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitinglip.atomic import TEMP_MARK, write_atomically
from bitinglip.settings import Settings

log = logging.getLogger(__name__)

#: the store's folder under ``MODEL_CACHE_DIR`` when ``BITINGLIP_REUSE_DIR`` is not set: inside the
#: registry's own hidden folder, since a model may be registered under any name a plain folder could have
STORE_DIR = ".bitinglip/results"
#: the tenant of jobs submitted without one (the Python client, the CLI)
DEFAULT_TENANT = "local"
#: a space with more files than this is merged into one when a job adds to it
COMPACT_FILES = 16
#: a temporary file older than this is a crashed writer's leftover, and a sweep removes it
STALE_TEMP_S = 3600.0
#: the built-in tasks whose output depends on the input alone
DETERMINISTIC_TASKS = ("embed", "classify")
#: bumped when the key's recipe changes, so that old entries are never read under a new meaning
KEY_VERSION = 1
#: the key's column in a store file, and the space it belongs to in the file's metadata
KEY_COLUMN = "_reuse_key"
SPACE_META = b"bitinglip.reuse_space"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _canonical(value: Any) -> str:
    """``value`` as one stable string: dicts by sorted key, tuples as lists, dataclasses (a
    generation row) as their fields; what JSON cannot take by its type name and repr."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if v is None or isinstance(v, (str, bool, int, float)):
            return v
        return f"{type(v).__name__}:{v!r}"

    return json.dumps(plain(value), sort_keys=True, ensure_ascii=False, allow_nan=True)


@dataclass(frozen=True)
class ReuseSpec:
    """That a job reuses results, and whose; small to pickle (part of ``JobSpec``).  Where the
    store lies and its cap are the worker's settings (:func:`store_root`), as its models are."""

    tenant: str = DEFAULT_TENANT


def store_root(settings: Settings) -> Path:
    """``BITINGLIP_REUSE_DIR``, else ``MODEL_CACHE_DIR/.bitinglip/results``: beside the models the results
    are keyed by, on the one path every worker already shares."""
    return Path(settings.reuse_dir) if settings.reuse_dir is not None else Path(settings.model_cache_dir) / STORE_DIR


def tenant_folder(root: Path, tenant: str) -> Path:
    """A tenant's part of the store: a hash, so that any name is a safe folder name."""
    return Path(root) / _digest("tenant", tenant)[:32]


def space_of(task: str, model_identity: str, options: Mapping[str, Any], runtime: Mapping[str, Any]) -> str:
    """The hash naming one (model weights, task, options, runtime choices)."""
    return _digest(str(KEY_VERSION), task, model_identity, _canonical(dict(options)), _canonical(dict(runtime)))


def row_key(space: str, row: Any) -> str:
    return _digest(space, _canonical(row))


class ResultStore:
    """One tenant's results for one space, in ``root``."""

    def __init__(self, root: Path, tenant: str, space: str, max_bytes: int) -> None:
        self.root, self.space, self.max_bytes = Path(root), space, max_bytes
        self.folder = tenant_folder(self.root, tenant) / space[:32]

    def lookup(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored result of each key that has one: key -> output columns (with ``truncated``)."""
        wanted = set(keys)
        found: dict[str, dict[str, Any]] = {}
        if not wanted:
            return found
        for path in self._files():
            rows = self._read(path, wanted - found.keys())
            if rows:
                found.update(rows)
                with contextlib.suppress(OSError):  # the file was used: the last to be evicted
                    os.utime(path)
            if len(found) == len(wanted):
                break
        return found

    def _files(self) -> list[Path]:
        try:
            names = [e.name for e in os.scandir(self.folder) if e.is_file()]
        except FileNotFoundError:
            return []
        # hidden names are files being written (or a crashed writer's leftovers): never read
        return sorted(self.folder / n for n in names if n.endswith(".parquet") and not n.startswith("."))

    def _read(self, path: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(path)
            if (file.schema_arrow.metadata or {}).get(SPACE_META) != self.space.encode():
                raise ValueError("the file belongs to another space")
            table = file.read()
        except FileNotFoundError:
            return {}  # compacted or evicted meanwhile: a miss
        except (OSError, ValueError, pa.ArrowException) as exc:
            # a file that does not read back whole is never trusted: the rows run again
            log.warning("result store: %s is unreadable (%s); removed", path, exc)
            path.unlink(missing_ok=True)
            return {}
        table = table.filter(pc.is_in(table[KEY_COLUMN], value_set=pa.array(sorted(wanted), pa.string())))
        columns = [c for c in table.column_names if c != KEY_COLUMN]
        values = [_column_values(table[c]) for c in columns]
        return {k: dict(zip(columns, row)) for k, *row in zip(table[KEY_COLUMN].to_pylist(), *values)}

    def save(self, frame: Any) -> None:
        """Add ``frame`` (a ``KEY_COLUMN``, the output columns, ``truncated``) as one new file,
        atomically; then compact the space and keep the store under its cap."""
        if frame is None or not len(frame):
            return
        import pyarrow as pa

        self.folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        self._write(table, self.folder / f"{uuid.uuid4().hex}.parquet")
        try:
            self._compact()
            evict(self.root, self.max_bytes)
        except OSError:  # housekeeping: the result is stored, and the next job tries again
            log.warning("result store: housekeeping in %s failed", self.folder, exc_info=True)

    def _write(self, table: Any, path: Path) -> None:
        import pyarrow.parquet as pq

        table = table.replace_schema_metadata({**(table.schema.metadata or {}), SPACE_META: self.space.encode()})
        write_atomically(path, lambda tmp: pq.write_table(table, tmp))

    def _compact(self) -> None:
        """Merge the space's files into one when there are more than :data:`COMPACT_FILES`.
        One compactor at a time (a lock file); readers see the old files or the new one,
        and a row in both is the same result."""
        files = self._files()
        if len(files) <= COMPACT_FILES:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        with open(self.folder / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another worker is compacting this space
            tables, merged = [], []
            for path in self._files():
                try:
                    tables.append(pq.read_table(path))
                    merged.append(path)
                except FileNotFoundError:
                    continue
                except (OSError, pa.ArrowException):
                    path.unlink(missing_ok=True)
            if len(tables) < 2:
                return
            try:
                table = pa.concat_tables(tables, promote_options="default")
            except pa.ArrowException:  # files of one space disagree on a column's type: leave them be
                return
            # the last copy of a key wins; all copies of a key hold the same result
            seen: dict[str, int] = {k: i for i, k in enumerate(table[KEY_COLUMN].to_pylist())}
            table = table.take(pa.array(sorted(seen.values()), pa.int64()))
            self._write(table, self.folder / f"{uuid.uuid4().hex}.parquet")
            for path in merged:
                path.unlink(missing_ok=True)


def _column_values(column: Any) -> list[Any]:
    """A stored column as the task gave it: vectors (lists of float32, an embedding) as numpy
    float32 arrays, everything else as Python values (None stays None, ints stay ints)."""
    import pyarrow as pa

    if pa.types.is_list(column.type) and pa.types.is_float32(column.type.value_type):
        return list(column.to_pandas())
    return column.to_pylist()


def evict(root: Path, max_bytes: int) -> int:
    """Remove the least recently used files until the store holds at most ``max_bytes``; a
    crashed writer's temporary files older than :data:`STALE_TEMP_S` go too.  Returns bytes freed."""
    entries: list[tuple[float, int, str]] = []
    now, freed = time.time(), 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if TEMP_MARK in name:
                if st.st_mtime < now - STALE_TEMP_S:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        freed += st.st_size
                continue
            if name.endswith(".parquet"):
                entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            freed += size
        total -= size
    return freed


def reusable_rows(task: str, options: Mapping[str, Any], rows: Iterable[Any]) -> list[bool]:
    """Which rows give the same result every time: every row of a task without sampling; a
    generation row when it is greedy (temperature 0) or seeded, with the job's options
    under its own params."""
    if task != "generate":
        return [True for _ in rows]
    flags = []
    for row in rows:
        params = {**options, **(getattr(row, "params", None) or {})}
        flags.append(float(params.get("temperature") or 0.0) == 0.0 or params.get("seed") is not None)
    return flags


def default_reuse(task: str, options: Mapping[str, Any]) -> bool:
    """``reuse`` when the caller does not say: on for deterministic settings (embed, classify,
    greedy or seeded generation), off for sampling without a seed and for a task of the
    user's own, which may not give the same output twice."""
    if task == "generate":
        return float(options.get("temperature") or 0.0) == 0.0 or options.get("seed") is not None
    return task in DETERMINISTIC_TASKS


def stable_runtime(runtime: Mapping[str, Any]) -> dict[str, Any]:
    """The load-time choices that change results (engine, precision): the plain values only,
    since the nested ones carry the timings behind a choice, which differ at every load."""
    return {k: v for k, v in runtime.items() if isinstance(v, (str, bool)) or v is None}


def store_frame(keys: Sequence[str], outputs: Sequence[Mapping[str, Any]], truncated: Sequence[bool],
                columns: Sequence[str]) -> Any:
    import pandas as pd

    data: dict[str, list[Any]] = {KEY_COLUMN: list(keys)}
    names = list(columns) + sorted({k for o in outputs for k in o} - set(columns))
    for name in names:
        data[name] = [o.get(name) for o in outputs]
    data["truncated"] = list(truncated)
    return pd.DataFrame(data)
