"""Send a job's partitions to workers that already hold its model.

The client asks every worker's model plugin what it has loaded (one
``client.run``), and the first partitions of a job go to those warm workers
as *loose* restrictions (``workers=[addr], allow_other_workers=True``): the
scheduler keeps them there, and falls back to any worker only when a warm
one leaves.  Partitions beyond the number of warm workers stay
unrestricted, so a big job still spreads over the cluster.

Placement is a preference: when asking fails, jobs run as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def _resident_here(dask_worker: Any) -> list[dict[str, Any]]:
    from bitinglip.platform.plugins.model_plugin import PLUGIN_NAME

    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return plugin.resident_info() if plugin is not None and hasattr(plugin, "resident_info") else []


def resident_models(client: Any) -> dict[str, list[dict[str, Any]]]:
    """What each worker has loaded, by worker address."""
    try:
        return dict(client.run(_resident_here))
    except Exception as exc:  # noqa: BLE001 - placement must never stop a job
        log.warning("could not ask the workers which models they hold: %s", exc)
        return {}


def warm_workers(client: Any, model: str, task: str | None = None,
                 resources: Mapping[str, float] | None = None) -> list[str]:
    """Addresses (sorted) of workers that hold ``model`` as the job names it
    (for ``task``, when given) and have ``resources``."""
    from bitinglip.platform.cluster.local import worker_resources

    capable = worker_resources(client)
    warm = []
    for addr, entries in resident_models(client).items():
        have = capable.get(addr, {})
        if resources and any(have.get(r, 0) < amount for r, amount in resources.items()):
            continue  # a loose restriction to a worker without the resource would bypass it
        if any(e["model"] == model and (task is None or e["task"] == task) for e in entries):
            warm.append(addr)
    return sorted(warm)


def prefer(warm: list[str], index: int) -> dict[str, Any]:
    """``client.submit`` keywords for partition ``index``: one warm worker
    each for the first partitions, none for the rest."""
    if index < len(warm):
        return {"workers": [warm[index]], "allow_other_workers": True}
    return {}
