"""A Dask preload that switches a worker or nanny process to JSON logs
(:func:`bitinglip.logs.dask_env` names it in the environment)."""

from __future__ import annotations

from typing import Any


def dask_setup(server: Any) -> None:
    from bitinglip.logs import configure

    configure("json")
