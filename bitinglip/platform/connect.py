"""``bitinglip.connect()``: a cluster (an existing one, or an embedded local
one), the model plugin on its workers, the Jobs page on an embedded
cluster's dashboard, and the :class:`~bitinglip.platform.jobs.client.Platform`
over them.  It assembles the managers, so it sits above them all.

::

    import bitinglip

    with bitinglip.connect() as platform:          # embedded local cluster
        ...
    platform = bitinglip.connect("tcp://scheduler:8786")   # an existing cluster
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bitinglip.errors import UnavailableError
from bitinglip.platform.cluster.bootstrap import check_main_guard
from bitinglip.platform.cluster.local import check_reachable, local_cluster
from bitinglip.platform.jobs.client import Platform
from bitinglip.platform.plugins.model_plugin import ModelPlugin
from bitinglip.settings import Settings, get_settings


def connect(address: str | None = None, *, settings: Settings | None = None, n_workers: int | None = None,
            preload: Iterable[tuple[str, str]] = (), dashboard_address: str | None = None,
            **client_kwargs: Any) -> Platform:
    """Connect to a Dask scheduler at ``address``, or start an embedded local
    cluster when there is none. ``preload`` lists ``(task, model)`` pairs that
    every worker loads at start."""
    from distributed import Client

    settings = settings or get_settings()
    cluster = None
    if address is None:
        check_main_guard()  # before any process starts: one line instead of a child's tracebacks
        cluster = local_cluster(settings, n_workers=n_workers, dashboard_address=dashboard_address)
        client = Client(cluster, **client_kwargs)
    else:
        from bitinglip.platform.cluster.tls import check_address, security

        check_address(settings, address)
        # a name that does not resolve fails in seconds, not after Dask's 30 s of retries; a scheduler
        # that is still starting (a closed port) gets those retries
        check_reachable(address, connect=False)
        if settings.tls:
            client_kwargs.setdefault("security", security(settings))
        try:
            client = Client(address, **client_kwargs)
        except OSError as exc:  # Dask's "Timed out trying to connect"
            raise UnavailableError(f"cannot reach the scheduler at {address}: {exc}") from exc
    try:
        # an embedded cluster shares these settings; remote workers read their own environment
        client.register_plugin(ModelPlugin(list(preload), gpu_memory_fraction=settings.gpu_memory_fraction,
                                           settings=settings if cluster is not None else None))
        if cluster is not None:  # the Jobs page on the dashboard this cluster prints, as `bitinglip scheduler` has
            from bitinglip.platform.ops.ops_plugin import OpsPlugin

            client.register_plugin(OpsPlugin())
    except Exception:
        client.close()
        if cluster is not None:
            cluster.close()
        raise
    return Platform(client, cluster, settings)
