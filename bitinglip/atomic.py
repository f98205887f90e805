"""Writing a file so that readers see the old one or the new one, never half.

The data goes to a temporary file next to the target, which is then renamed
over it (``os.replace`` is atomic within one file system).  The temporary
name is hidden (a leading dot) so that a reader of the folder, pyarrow or
Dask among them, never takes a half-written file for a result, and it is
unique per writer (process and call) so that two writers never share one.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: what every temporary name contains: a sweep of leftovers matches ``*{TEMP_MARK}*``
TEMP_MARK = ".tmp-"


def temp_path(path: str | os.PathLike[str]) -> str:
    """Where ``path`` is written before its atomic rename."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_atomically(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to
    ``path``; on any failure the temporary file is removed and the error
    goes on."""
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomically(path: str | os.PathLike[str], data: Any, **dump_kw: Any) -> None:
    """``data`` as JSON at ``path``, atomically (``dump_kw`` go to :func:`json.dump`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(data, fh, **dump_kw)

    write_atomically(path, write)
