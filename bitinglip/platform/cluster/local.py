"""The Dask cluster: an embedded LocalCluster, or an existing scheduler.

On a machine with GPUs the embedded cluster starts one worker process per
GPU, pinned with ``CUDA_VISIBLE_DEVICES`` and tagged with the Dask resource
``GPU=1`` (as dask-cuda does).  Without GPUs it starts CPU workers, one per
core by default with one task thread each and torch's intra-op threads set
to the cores each worker owns: on 2 cores two single-threaded processes
embed about 1.6x faster than one process with two torch threads.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

from distributed import LocalCluster, Nanny

from bitinglip.settings import Settings

#: environment of every worker process. Dask's nanny sets
#: MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's mmap threshold at
#: 128 KiB: every activation tensor is then mmapped and unmapped, and the
#: page faults cost a forward pass about 35% more CPU (measured on
#: all-MiniLM-L6-v2). Tensors below 64 MiB stay on the heap instead, and the
#: heap keeps up to 256 MiB of freed memory rather than handing it back after
#: every tensor (with a 64 KiB trim threshold a 25 MB GELU took 18 ms instead
#: of 5: fresh pages again each time). glibc reads both only at process start,
#: so they go in the nanny's pre-spawn environment, not in the worker's ``env``.
PRE_SPAWN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024 * 1024),
                 "MALLOC_TRIM_THRESHOLD_": str(256 * 1024 * 1024)}
WORKER_ENV = {**PRE_SPAWN_ENV, "TOKENIZERS_PARALLELISM": "false"}
PROFILE_INTERVAL = "100ms"


def pre_spawn_environ() -> dict[str, Any]:
    """Dask's pre-spawn environment for BitingLip workers."""
    import dask

    current = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    return {**current, **PRE_SPAWN_ENV}


def _pre_spawn_config() -> dict[str, Any]:
    # the statistical profiler samples every task thread every 10 ms by
    # default; every 100 ms keeps the dashboard's profile and most of the CPU
    return {"distributed.nanny.pre-spawn-environ": pre_spawn_environ(),
            "distributed.worker.profile.interval": PROFILE_INTERVAL}


def worker_process_env() -> dict[str, str]:
    """The same settings for ``dask worker`` started as a command, as Dask
    reads them from the environment."""
    return {**WORKER_ENV,
            "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": repr(pre_spawn_environ()),
            "DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL": PROFILE_INTERVAL}


def gpu_count() -> int:
    """GPUs this process can see, without keeping a CUDA context.  On a Linux machine without a GPU driver's
    device files the answer is 0 without importing torch: the client has no other use for torch, and the
    import held up an embedded cluster's start, before any worker started, by 8 s (2 loaded cores)."""
    if sys.platform.startswith("linux") and not _gpu_device_files():
        return 0
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _gpu_device_files() -> bool:
    """NVIDIA's (``/dev/nvidiactl``, ``/dev/nvidia0``, ...) or ROCm's (``/dev/kfd``): what a GPU container
    gets mounted and what CUDA or HIP opens."""
    dev = Path("/dev")
    return (dev / "nvidiactl").exists() or (dev / "kfd").exists() or any(dev.glob("nvidia[0-9]*"))


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_cluster(settings: Settings, n_workers: int | None = None, gpus: int | None = None,
                  dashboard_address: str | None = None, **kwargs: Any) -> Any:
    """Start a LocalCluster laid out for this machine's GPUs or cores."""
    import dask

    gpus = gpu_count() if gpus is None else gpus
    dashboard = settings.dashboard_address if dashboard_address is None else dashboard_address
    with dask.config.set(_pre_spawn_config()):
        if gpus:
            n = min(n_workers or settings.max_workers or gpus, gpus)
            return GPULocalCluster(gpus, n, threads=max(1, cpu_count() // n), dashboard_address=dashboard,
                                   worker_class=EngineNanny, **kwargs)
        n = n_workers or settings.max_workers or cpu_count()
        threads = max(1, cpu_count() // n)
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=dashboard,
                            env={**WORKER_ENV, "OMP_NUM_THREADS": str(threads)}, worker_class=EngineNanny, **kwargs)


#: seconds a closing worker gets to tear down its plugins and exit before its nanny kills it.  Dask's default
#: (5 s, of which 4 s before the kill) is less than a vLLM engine's own shutdown on a loaded CPU (its model
#: runner's cleanup and a full garbage collection: 3-4 s measured here): the nanny warned "still alive after
#: 4.0 seconds, killing" on every close after a generate job, and a kill mid-shutdown can leave a GPU engine's
#: child process behind.  A worker that has nothing to tear down exits in well under a second either way.
WORKER_CLOSE_S = 30.0


class EngineNanny(Nanny):
    """A nanny that gives its worker :data:`WORKER_CLOSE_S` to close."""

    async def close(self, timeout: float = WORKER_CLOSE_S, reason: str = "nanny-close") -> Any:  # type: ignore[override]
        return await super().close(timeout=timeout, reason=reason)


class GPULocalCluster(LocalCluster):
    """One worker process per GPU: named ``gpu-{i}``, pinned with
    ``CUDA_VISIBLE_DEVICES=i``, tagged with the resource ``GPU=1``, with
    ``threads`` torch threads (``OMP_NUM_THREADS``).  The layout lives in
    :meth:`new_worker_spec`, as in dask-cuda's ``LocalCUDACluster``, so
    ``scale()`` keeps it: scaling up takes the lowest free GPU, and scaling
    past the last GPU is a ``ValueError``."""

    def __init__(self, gpus: int, n_workers: int, *, threads: int = 1, **kwargs: Any) -> None:
        if not 0 <= n_workers <= gpus:
            raise ValueError(f"{n_workers} workers for {gpus} GPUs: at most one worker per GPU")
        self.gpus, self.threads = gpus, threads
        # LocalCluster lays out its first workers without new_worker_spec: start none,
        # then scale, which asks new_worker_spec for each
        super().__init__(n_workers=0, threads_per_worker=1, processes=True, **kwargs)
        self.scale(n_workers)
        self.wait_for_workers(n_workers)

    def new_worker_spec(self) -> dict[str, dict[str, Any]]:
        free = [i for i in range(self.gpus) if f"gpu-{i}" not in self.worker_spec]
        if not free:
            raise ValueError(f"each of the {self.gpus} GPUs already has a worker")
        i = free[0]
        spec = copy.deepcopy(self.new_spec)
        spec["options"].update({
            "name": f"gpu-{i}", "resources": {"GPU": 1},
            "env": {**WORKER_ENV, "CUDA_VISIBLE_DEVICES": str(i), "OMP_NUM_THREADS": str(self.threads)}})
        return {f"gpu-{i}": spec}


def check_reachable(address: str, timeout: float = 5.0, connect: bool = True) -> None:
    """Resolve the scheduler's host and (``connect``) open a TCP connection
    to it, each within ``timeout`` seconds; else :class:`UnavailableError`
    naming the address.  Dask's own connect retries for 30 s and then raises
    a bare ``OSError``; a name that does not resolve will not in 30 s either."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    from bitinglip.errors import UnavailableError
    from bitinglip.netcheck import unreachable

    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return  # inproc://, ucx://: not a TCP endpoint to try
    host, port = parse_host_port(location)
    why = unreachable(host, int(port), timeout, connect)
    if why is not None:
        raise UnavailableError(f"cannot reach the scheduler at {address}: {why}")


def worker_resources(client: Any) -> dict[str, dict[str, float]]:
    """Each worker's declared resources, by address."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {addr: dict(info.get("resources") or {}) for addr, info in workers.items()}
