"""Inputs of every accepted kind, turned into partitions.

Lists and pandas objects are checked on the client (a bad row is named
before any work starts) and sliced; file paths (Parquet, JSONL, CSV) and dask
DataFrames stay lazy, so each partition is read on the worker that runs it
and inputs larger than memory stream through.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pandas as pd

from bitinglip.errors import InputError
from bitinglip.platform.tasks.builtin import texts_or_error

MIN_PARTITION_ROWS = 64
MAX_PARTITION_ROWS = 5000
#: bytes per partition when reading CSV or JSONL text files
TEXT_FILE_BLOCKSIZE = "4MB"
#: the names of the files of a Parquet directory that are read
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


@dataclass
class Partitions:
    """``parts`` are ``(data, offset)`` pairs: data is a list, a pandas
    DataFrame, or a dask Delayed that yields one."""

    parts: list[tuple[Any, int]]
    total: int
    lazy: bool = False
    #: the rows per partition the input was cut to
    size: int = 0

    def rows(self) -> list[int]:
        """Rows in each part (parts are contiguous runs of the input)."""
        offsets = [offset for _, offset in self.parts] + [self.total]
        return [b - a for a, b in pairwise(offsets)]


def partition_rows(total: int, workers: int, configured: int = 0, minimum: int = MIN_PARTITION_ROWS) -> int:
    """Rows per partition: about four partitions per worker, so the load
    balances and progress moves, but not so small that sorting by length
    inside a partition stops paying (``minimum``: a task whose rows cost
    much, like generation, sets a lower one so that every worker gets some)."""
    if configured:
        return configured
    per = math.ceil(total / max(1, 4 * workers)) if total else minimum
    return max(minimum, min(MAX_PARTITION_ROWS, per))


def _slices(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(total, start + size)) for start in range(0, total, size)]


def require_column(columns: Iterable[Any], name: str, source: str = "the input",
                   option: str = "text_column=") -> None:
    """Refuse an input without the text column ``name``, listing the columns
    it has and how to name another (``option``: the CLI says ``--text-column``)."""
    columns = list(columns)
    if name not in columns:
        raise InputError(f"{source} has no column {name!r} (columns: {', '.join(map(str, columns))}); "
                         f"name the text column with {option}")


@dataclass(frozen=True)
class RowShape:
    """What a task reads of a row: the input columns beside the text, those
    that may stand in for the text (``messages`` for ``generate``), and the
    check of one row (``check(text, extra, row_id)``, raising InputError)."""

    extra: tuple[str, ...] = ()
    alternatives: tuple[str, ...] = ()
    check: Callable[[Any, dict[str, Any], Any], Any] | None = None

    def columns(self, columns: Iterable[Any], text_column: str) -> list[str]:
        """The columns to keep of an input with ``columns`` (refusing one without any text)."""
        columns = list(columns)
        if not any(c in columns for c in self.alternatives):
            require_column(columns, text_column)
        return [c for c in ("id", text_column, *self.extra) if c in columns]

    def check_frame(self, frame: pd.DataFrame, text_column: str, ids: list[Any]) -> None:
        if self.check is None:
            texts_or_error(frame[text_column].tolist(), ids)
            return
        texts = frame[text_column].tolist() if text_column in frame.columns else [None] * len(frame)
        extra = {c: frame[c].tolist() for c in self.extra if c in frame.columns}
        for pos, row_id in enumerate(ids):
            self.check(texts[pos], {c: v[pos] for c, v in extra.items()}, row_id)


def _from_frame(frame: pd.DataFrame, text_column: str, size: int, check_rows: bool, shape: RowShape) -> Partitions:
    keep = shape.columns(frame.columns, text_column)
    frame = frame.reset_index(drop=True)
    if "id" in frame.columns:
        if frame["id"].isna().any():
            raise InputError(f"column 'id' is empty at row {int(frame['id'].isna().to_numpy().argmax())}")
        if not frame["id"].is_unique:
            dup = frame["id"][frame["id"].duplicated()].iloc[0]
            raise InputError(f"column 'id' must be unique; {dup!r} appears more than once")
        ids = frame["id"].tolist()
    else:
        ids = list(range(len(frame)))
    if check_rows:
        shape.check_frame(frame, text_column, ids)
    return Partitions([(frame.iloc[a:b][keep], a) for a, b in _slices(len(frame), size)], len(frame), size=size)


def _inside(path: Path, root: Path | None, what: str) -> Path:
    """``path`` with every link resolved; refused if that leaves ``root``."""
    real = path.resolve()
    if root is not None and not real.is_relative_to(root):
        raise InputError(f"{what} {str(path)!r} leads to {str(real)!r}, outside the input directory {str(root)!r}")
    return real


def parquet_files(folder: Path, root: Path | None = None) -> list[Path]:
    """The Parquet files a directory input is made of, each resolved through
    its links and checked against ``root``: the reader is then given exactly
    these files, so nothing a link points to is read unchecked.  Names
    starting with ``_`` or ``.`` are skipped, as pyarrow does, and files come
    in Dask's order (natural order of their paths)."""
    from dask.utils import natural_sort_key

    files: dict[str, Path] = {}
    seen: set[Path] = set()
    pending = [_inside(folder, root, "input directory")]
    while pending:
        current = pending.pop()
        if current in seen:  # a link back up the tree
            continue
        seen.add(current)
        for entry in sorted(current.iterdir()):
            if entry.name.startswith(("_", ".")):
                continue
            if entry.is_dir():
                pending.append(_inside(entry, root, "input folder"))
            elif entry.name.lower().endswith(PARQUET_SUFFIXES):
                files[str(entry)] = _inside(entry, root, "input file")
    if not files:
        raise InputError(f"input directory {str(folder)!r} holds no Parquet files ({', '.join(PARQUET_SUFFIXES)})")
    ordered = [files[name] for name in sorted(files, key=natural_sort_key)]
    return list(dict.fromkeys(ordered))  # a file reached through two links is read once


def _read_path(path: Path, text_column: str, root: Path | None) -> Any:
    import dask

    if not path.exists():
        raise InputError(f"input path {str(path)!r} does not exist")
    files = parquet_files(path, root) if path.is_dir() else [_inside(path, root, "input file")]
    # keep values as they are in the file: a number where text belongs must
    # reach the row check as a number, not be turned into the string "5"
    with dask.config.set({"dataframe.convert-string": False}):
        return _read_known_type(path, files, text_column)


def _read_known_type(path: Path, files: list[Path], text_column: str) -> Any:
    import dask.dataframe as dd

    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith(PARQUET_SUFFIXES):
            return dd.read_parquet([str(f) for f in files])
        if name.endswith((".jsonl", ".ndjson", ".json")):
            return dd.read_json(str(files[0]), lines=True, blocksize=TEXT_FILE_BLOCKSIZE)
        if name.endswith((".csv", ".tsv")):
            # CSV has no null: every field is text as written, so "" is an
            # empty text (as in Parquet and JSONL) and "NA" or "null" are words
            return dd.read_csv(str(files[0]), sep="\t" if name.endswith(".tsv") else ",",
                               blocksize=TEXT_FILE_BLOCKSIZE, dtype={text_column: "object"},
                               keep_default_na=False)
    except Exception as exc:
        raise InputError(f"cannot read input {str(path)!r}: {exc}") from exc
    raise InputError(f"input {str(path)!r}: unknown file type; use .parquet, .jsonl or .csv")


def _rows_of(frame: pd.DataFrame, start: int, stop: int) -> pd.DataFrame:
    return frame.iloc[start:stop]


def _from_dask(frame: Any, text_column: str, client: Any, workers: int, configured_rows: int,
               min_rows: int, shape: RowShape, count_here: bool = False) -> Partitions:
    """Partitions of a Dask frame.  ``count_here``: its rows are counted in
    this process (a path this process has just found and read the schema
    of) rather than by tasks on the cluster, which queue behind every busy
    worker thread and every queued partition of a higher or equal priority:
    an OpenAI batch's ``POST /v1/batches`` waited 98 s and 205 s for them
    while the workers ran online generation."""
    import dask
    from dask import delayed

    keep = shape.columns(frame.columns, text_column)
    pieces = frame[keep].to_delayed()
    # count the very pieces that will be sliced: Dask may fuse
    # ``map_partitions(len)`` into fewer partitions than ``to_delayed()``
    # gives once columns are projected away, and pairing the two lost rows
    counts = [delayed(len)(p) for p in pieces]
    if count_here:  # one piece at a time, in this thread
        lengths = [int(n) for n in dask.compute(*counts, scheduler="sync")]
    else:
        lengths = [int(n) for n in client.gather(client.compute(counts))]
    total = int(sum(lengths))
    size = partition_rows(total, workers, configured_rows, min_rows)
    parts: list[tuple[Any, int]] = []
    offset = 0
    for data, n in zip(pieces, lengths, strict=True):
        # a big file partition is read once and shared out in slices, so
        # one large Parquet file still keeps every worker busy
        for a, b in _slices(n, size) if n > size else ([(0, n)] if n else []):
            parts.append((data if (a, b) == (0, n) else delayed(_rows_of)(data, a, b), offset + a))
        offset += n
    return Partitions(parts, total, lazy=True, size=size)


def to_partitions(inputs: Any, text_column: str, workers: int, client: Any, configured_rows: int = 0,
                  check_rows: bool = True, min_rows: int | None = None,
                  root: str | os.PathLike[str] | None = None, shape: RowShape | None = None) -> Partitions:
    """Partitions for any accepted input; raises :class:`InputError` saying
    what is wrong. With ``check_rows`` a bad row in a list or pandas input is
    refused here, before any work starts; without, the workers report it.
    ``min_rows``: the task's smallest automatic partition (default
    :data:`MIN_PARTITION_ROWS`).  ``root``: a path input, and every file of
    a directory input once its links are resolved, must lie inside it.
    ``shape``: the task's columns and row check (default: a text per row)."""
    min_rows = min_rows or MIN_PARTITION_ROWS
    shape = shape or RowShape()
    if isinstance(inputs, (str, os.PathLike)):
        real_root = Path(root).expanduser().resolve() if root is not None else None
        return _from_dask(_read_path(Path(inputs).expanduser(), text_column, real_root), text_column, client,
                          workers, configured_rows, min_rows, shape, count_here=True)
    if type(inputs).__module__.startswith("dask") and hasattr(inputs, "to_delayed"):
        return _from_dask(inputs, text_column, client, workers, configured_rows, min_rows, shape)
    if isinstance(inputs, pd.Series):
        inputs = inputs.tolist()
    if isinstance(inputs, pd.DataFrame):
        return _from_frame(inputs, text_column, partition_rows(len(inputs), workers, configured_rows, min_rows),
                           check_rows, shape)
    if isinstance(inputs, Sequence) and not isinstance(inputs, (bytes, bytearray)):
        rows = list(inputs)
        if check_rows and shape.check is not None:
            for i, row in enumerate(rows):
                shape.check(row, {}, i)
        elif check_rows:
            texts_or_error(rows, range(len(rows)))
        size = partition_rows(len(rows), workers, configured_rows, min_rows)
        return Partitions([(rows[a:b], a) for a, b in _slices(len(rows), size)], len(rows), size=size)
    raise InputError(f"inputs must be a list of strings, a pandas DataFrame or Series, a dask DataFrame, "
                     f"or a Parquet/JSONL/CSV path; got {type(inputs).__name__}")
