"""What the ``bitinglip`` command checks before it starts a cluster, and how
it words errors for a shell user.

Starting an embedded cluster takes half a minute on a small machine; an
unknown model, a wrong ``--text-column`` or ``--gpu`` without a GPU must not
cost that wait, nor print worker tracebacks before the one line that
matters.  Errors raised deep down name Python keywords (``text_column=``);
:func:`cli_words` turns them into the flags a shell user typed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bitinglip.errors import InputError, NoGPUWorkersError, UnavailableError

#: Python keyword (as messages write it) -> the flag of ``bitinglip run``
_FLAGS = [
    (re.compile(r"\bsubmit with gpu=False\b"), "run with --cpu"),
    (re.compile(r"\bgpu=False\b"), "--cpu"),
    (re.compile(r"\bgpu=True\b"), "--gpu"),
    (re.compile(r"\btext_column=(?=\W|$)"), "--text-column"),
    (re.compile(r"\bpartition_rows="), "--partition-rows "),
    (re.compile(r"\btoken_budget="), "--token-budget "),
    (re.compile(r"\binputs="), "--input "),
    (re.compile(r"\bn_workers="), "--workers "),
]

#: top-level module -> the extra of ``bitinglip`` that installs it
EXTRAS = {"uvicorn": "gateway", "starlette": "gateway", "jwt": "gateway", "httpx": "gateway",
          "prometheus_client": "gateway", "pynvml": "gpu", "nbclient": "dev", "nbformat": "dev"}


def cli_words(message: str) -> str:
    """``message`` with Python keywords replaced by the CLI's flags."""
    for pattern, flag in _FLAGS:
        message = pattern.sub(flag, message)
    return message.replace("--text-column ''", "--text-column").rstrip()


def missing_module(command: str, exc: ModuleNotFoundError) -> str:
    """One line for a missing optional dependency, saying what to install."""
    module = (exc.name or "").split(".")[0] or str(exc)
    extra = EXTRAS.get(module)
    install = f"pip install 'bitinglip[{extra}]'" if extra else f"pip install {module}"
    return (f"bitinglip {command}: the Python package {module!r} is not installed"
            f"{f' (the {extra!r} extra)' if extra else ''}; {install}")


def input_columns(path: Path) -> list[str]:
    """The column names of a Parquet (file or folder), JSONL or CSV input,
    read from its schema or first line only."""
    import pandas as pd

    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith((".parquet", ".pq")):
            import pyarrow.dataset as ds

            return list(ds.dataset(str(path), format="parquet").schema.names)
        if name.endswith((".jsonl", ".ndjson", ".json")):
            return [str(c) for c in pd.read_json(path, lines=True, nrows=1).columns]
        if name.endswith((".csv", ".tsv")):
            return [str(c) for c in pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",", nrows=0).columns]
    except Exception as exc:
        raise InputError(f"--input {str(path)!r}: cannot read it: {exc}") from exc
    raise InputError(f"--input {str(path)!r}: unknown file type; use .parquet, .jsonl or .csv")


def check_text_column(path: Path, text_column: str, alternatives: tuple[str, ...] = ()) -> None:
    """``alternatives``: columns that may stand in for the text (``messages`` for generate)."""
    columns = input_columns(path)
    if columns and not any(c in columns for c in alternatives):
        from bitinglip.platform.jobs import require_column  # pandas: only when a path is checked

        require_column(columns, text_column, f"--input {str(path)!r}", "--text-column")


def check_model_here(model: str, settings: Any) -> None:
    """An embedded cluster's workers see this machine's files: resolve here."""
    from bitinglip.platform.models import resolve_model

    resolve_model(model, settings)


def check_gpu_here() -> None:
    from bitinglip.platform.cluster import gpu_count

    if not gpu_count():
        raise NoGPUWorkersError("--gpu: this machine has no visible GPU (CUDA is not available to torch); "
                                "drop --gpu, or give --address of a cluster with GPU workers")


def check_scheduler_reachable(address: str) -> None:
    """A dead scheduler is an error of one line, not a `dask worker`
    traceback half a minute later."""
    from bitinglip.platform.cluster import check_reachable

    try:
        check_reachable(address)
    except UnavailableError as exc:
        raise UnavailableError(f"{exc}; start it first (`bitinglip scheduler` or `bitinglip up`), or leave out "
                               "--no-restart to wait for it") from None
