"""The embedded cluster's GPU layout, on a CPU machine that pretends to have
two GPUs: one worker process per GPU, named ``gpu-{i}``, pinned with
``CUDA_VISIBLE_DEVICES``, tagged ``GPU=1``, and ``scale()`` keeps that
layout (GPULocalCluster overrides ``new_worker_spec``).  Starts two worker
processes."""

from __future__ import annotations

import os
from typing import Any

import pytest
from distributed import WorkerPlugin

from bitinglip.platform.cluster.local import PRE_SPAWN_ENV, GPULocalCluster, local_cluster
from bitinglip.settings import Settings


def _layout(client: Any) -> dict[str, tuple[dict[str, float], str, str, str]]:
    """Per worker name: its resources, CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS
    and the glibc setting the nanny sets before the process starts."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    env = client.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES", ""), os.environ.get("OMP_NUM_THREADS", ""),
                              os.environ.get("MALLOC_MMAP_THRESHOLD_", "")))
    return {w["name"]: (dict(w["resources"]), *env[address]) for address, w in info.items()}


def test_scale_keeps_the_gpu_layout(tmp_path: Any) -> None:
    from distributed import Client

    mmap = PRE_SPAWN_ENV["MALLOC_MMAP_THRESHOLD_"]
    with local_cluster(Settings(model_cache_dir=tmp_path), n_workers=1, gpus=2, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert isinstance(cluster, GPULocalCluster)
        threads = str(cluster.threads)
        assert _layout(client) == {"gpu-0": ({"GPU": 1}, "0", threads, mmap)}

        cluster.scale(2)
        client.wait_for_workers(2)
        layout = _layout(client)
        assert layout["gpu-0"] == ({"GPU": 1}, "0", threads, mmap)
        assert layout["gpu-1"][:3] == ({"GPU": 1}, "1", threads)
        assert set(layout) == {"gpu-0", "gpu-1"}

        with pytest.raises(ValueError, match="2 GPUs"):
            cluster.scale(3)
        assert set(cluster.worker_spec) == {"gpu-0", "gpu-1"}


def test_more_workers_than_gpus_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="3 workers for 2 GPUs"):
        GPULocalCluster(2, 3)


class _SlowTeardown(WorkerPlugin):
    """A worker plugin whose teardown takes as long as a vLLM engine's
    shutdown on a loaded CPU, and leaves a file when it has finished."""

    name = "slow-teardown"

    def __init__(self, done: str, seconds: float) -> None:
        self.done, self.seconds = done, seconds

    def setup(self, worker: Any) -> None:
        pass

    def teardown(self, worker: Any) -> None:
        import time

        time.sleep(self.seconds)
        with open(self.done, "w") as f:
            f.write("torn down")


def test_a_closing_worker_gets_the_time_its_engine_needs_to_shut_down(tmp_path: Any,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Dask's nanny kills a worker still closing after 4 s; an engine's
    teardown took 3-4 s here (the nanny warned on every close after a generate job)."""
    from distributed import Client

    done = tmp_path / "torn-down"
    with local_cluster(Settings(model_cache_dir=tmp_path), n_workers=1, gpus=0, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(_SlowTeardown(str(done), 6.0))
    assert done.read_text() == "torn down"
    assert not [r for r in caplog.records if "still alive after" in r.getMessage()]
