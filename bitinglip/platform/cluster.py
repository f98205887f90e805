"""The Dask cluster: an embedded LocalCluster, or an existing scheduler.

On a machine with GPUs the embedded cluster starts one worker process per
GPU, pinned with ``CUDA_VISIBLE_DEVICES`` and tagged with the Dask resource
``GPU=1`` (as dask-cuda does).  Without GPUs it starts CPU workers, one per
core by default with one task thread each and torch's intra-op threads set
to the cores each worker owns: on 2 cores two single-threaded processes
embed about 1.6x faster than one process with two torch threads.
"""

from __future__ import annotations

import os
from typing import Any

from bitinglip.platform.settings import Settings


def gpu_count() -> int:
    """GPUs this process can see, without keeping a CUDA context."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_cluster(settings: Settings, n_workers: int | None = None, gpus: int | None = None,
                  dashboard_address: str | None = None, **kwargs: Any) -> Any:
    """Start a LocalCluster laid out for this machine's GPUs or cores."""
    from distributed import LocalCluster, Nanny

    gpus = gpu_count() if gpus is None else gpus
    dashboard = settings.dashboard_address if dashboard_address is None else dashboard_address
    if gpus:
        n = min(n_workers or settings.max_workers or gpus, gpus)
        cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True,
                               dashboard_address=dashboard, **kwargs)
        template = cluster.new_worker_spec()
        options = next(iter(template.values()))["options"]
        threads = max(1, cpu_count() // n)
        for i in range(n):
            cluster.worker_spec[f"gpu-{i}"] = {"cls": Nanny, "options": {
                **options, "resources": {"GPU": 1}, "name": f"gpu-{i}",
                "env": {"CUDA_VISIBLE_DEVICES": str(i), "OMP_NUM_THREADS": str(threads)}}}
        cluster.sync(cluster._correct_state)
        cluster.wait_for_workers(n)
        return cluster
    n = n_workers or settings.max_workers or cpu_count()
    threads = max(1, cpu_count() // n)
    return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=dashboard,
                        env={"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}, **kwargs)


def worker_resources(client: Any) -> dict[str, dict[str, float]]:
    """Each worker's declared resources, by address."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {addr: dict(info.get("resources") or {}) for addr, info in workers.items()}
