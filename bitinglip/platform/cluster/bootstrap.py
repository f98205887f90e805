"""A script that starts an embedded cluster needs ``if __name__ == "__main__":``.

Dask starts worker processes with multiprocessing's "spawn": each child
imports the main script again, so a script that calls ``connect()`` at its
top level starts a cluster in every worker, and multiprocessing stops them
("An attempt has been made to start a new process before the current
process has finished its bootstrapping phase") with about 490 lines of
tracebacks.  :func:`check_main_guard` sees this before any process starts,
from where in the main script the call comes, and says in one line what to
add.
"""

from __future__ import annotations

import ast
import inspect
import multiprocessing
import sys
from pathlib import Path

from bitinglip.errors import ConfigError

HINT = ('bitinglip.connect() without an address starts worker processes that import {script} again: '
        'put the code that calls it under `if __name__ == "__main__":` (see examples/quickstart.py)')


def _start_method() -> str:
    import dask

    return str(dask.config.get("distributed.worker.multiprocessing-method", "spawn"))


def _guards(tree: ast.Module) -> list[tuple[int, int]]:
    """Line spans of top-level ``if __name__ == "__main__":`` bodies."""
    spans = []
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            spans.append((node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno))
    return spans


def check_main_guard() -> None:
    """Raise :class:`ConfigError` with the one-line hint when the main
    script is calling us from its top level outside a ``__main__`` guard
    (or when this is a spawned child re-running that script)."""
    if _start_method() == "fork":
        return  # a forked child does not import the script again
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if main is None or not script or not script.endswith(".py"):
        return  # python -c, a REPL, Jupyter: there is no script to import again
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name.endswith("__main__"):
        return  # python -m package: multiprocessing does not run a package's __main__ again
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise ConfigError(HINT.format(script=Path(script).name))  # a spawned child re-running the script
    frame = inspect.currentframe()
    while frame is not None and not (frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:
        return  # not called while the script's top level runs (a callback, a thread)
    line = frame.f_lineno
    del frame
    try:
        tree = ast.parse(Path(script).read_text())
    except (OSError, SyntaxError, ValueError):
        return
    if not any(start <= line <= end for start, end in _guards(tree)):
        raise ConfigError(HINT.format(script=Path(script).name))
