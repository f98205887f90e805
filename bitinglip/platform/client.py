"""The Python entry point: ``bitinglip.connect()`` and the Platform it gives.

::

    import bitinglip

    with bitinglip.connect() as platform:          # embedded local cluster
        job = platform.submit("embed", model="all-MiniLM-L6-v2", inputs=["a", "b"])
        job.progress()
        df = job.result()

    platform = bitinglip.connect("tcp://scheduler:8786")   # an existing cluster
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from bitinglip.platform.cluster import local_cluster, worker_resources
from bitinglip.platform.errors import InputError, NoGPUWorkersError
from bitinglip.platform.inputs import to_partitions
from bitinglip.platform.jobs import Job, write_manifest
from bitinglip.platform.placement import prefer, warm_workers
from bitinglip.platform.registry import Registry
from bitinglip.platform.runner import PROGRESS_TOPIC, JobSpec, run_partition
from bitinglip.platform.settings import Settings, get_settings
from bitinglip.platform.tasks import TaskType, check_task_type, get_task
from bitinglip.worker_plugins.models import ModelPlugin


class Platform:
    """A connection to a Dask cluster that runs BitingLip jobs.

    ``platform.client`` is the underlying :class:`distributed.Client`.
    """

    def __init__(self, client: Any, cluster: Any = None, settings: Settings | None = None) -> None:
        self.client = client
        self.cluster = cluster
        self.settings = settings or get_settings()
        self.tasks: dict[str, TaskType] = {}
        self._jobs: weakref.WeakValueDictionary[str, Job] = weakref.WeakValueDictionary()
        client.subscribe_topic(PROGRESS_TOPIC, self._on_progress)

    def _on_progress(self, event: Any) -> None:
        _, msg = event
        job = self._jobs.get(msg.get("job")) if isinstance(msg, dict) else None
        if job is not None:
            job._on_progress(msg)

    @property
    def dashboard_link(self) -> str:
        return str(self.client.dashboard_link)

    def register_task(self, task: TaskType) -> TaskType:
        """Make a task type of your own available to :meth:`submit` by name."""
        check_task_type(task)
        self.tasks[task.name] = task
        return task

    @property
    def models(self) -> Registry:
        """The model registry: ``platform.models.add/list/show/verify/remove``."""
        return Registry(self.settings)

    def gpu_workers(self) -> list[str]:
        return [a for a, r in worker_resources(self.client).items() if r.get("GPU", 0) > 0]

    def submit(self, task: str | TaskType, model: str, inputs: Any, *, output: str | os.PathLike[str] | None = None,
               text_column: str = "text", options: Mapping[str, Any] | None = None, gpu: bool | None = None,
               partition_rows: int | None = None, token_budget: int | None = None, job_id: str | None = None,
               **task_options: Any) -> Job:
        """Run ``task`` with ``model`` over ``inputs`` and return the :class:`Job`.

        ``inputs``: a list of strings, a pandas DataFrame or Series, a dask
        DataFrame, or a Parquet/JSONL/CSV path (``text_column`` names the
        text; an ``id`` column, if any, is kept).  ``output``: a directory for
        Parquet results, one file per partition plus a manifest.  ``gpu``:
        True demands GPU workers, False keeps to any worker, None uses GPUs
        when the cluster has them.  Task options go in ``options`` or as
        keyword arguments (``normalize=True``, ``max_new_tokens=20``).
        """
        task_type = get_task(task, self.tasks)
        merged = task_type.check_options({**(options or {}), **task_options})
        for name, value in (("partition_rows", partition_rows), ("token_budget", token_budget)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InputError(f"{name}={value!r}: expected a whole number of at least 1")
        gpu_addrs = self.gpu_workers()
        if gpu and not gpu_addrs:
            workers = len(worker_resources(self.client))
            raise NoGPUWorkersError(
                f"the job asks for GPUs but none of the cluster's {workers} workers has the GPU resource; "
                "start workers with `dask worker ADDRESS --resources GPU=1` or submit with gpu=False")
        use_gpu = bool(gpu_addrs) if gpu is None else gpu
        # where the model resolves is where it will run: ask a worker
        resolve = self.client.submit(_resolve, model, pure=False,
                                     resources={"GPU": 1} if use_gpu else None)
        resolve.result()
        job_id = job_id or uuid.uuid4().hex
        out_dir = None
        if output is not None:
            out_dir = os.path.abspath(os.fspath(output))
            os.makedirs(out_dir, exist_ok=True)
        spec = JobSpec(job_id, task_type, model, merged, text_column,
                       token_budget or self.settings.token_budget, out_dir)
        workers = max(1, len(gpu_addrs) if use_gpu else len(worker_resources(self.client)))
        parts = to_partitions(inputs, text_column, workers, self.client,
                              partition_rows or self.settings.partition_rows)
        resources = {"GPU": 1} if use_gpu else None
        futures = []
        if parts.lazy:
            from dask import delayed

            tasks = [delayed(run_partition)(data, spec, i, offset, dask_key_name=f"bitinglip-{job_id}-{i}")
                     for i, (data, offset) in enumerate(parts.parts)]
            futures = self.client.compute(tasks, resources=resources)
        else:
            warm = warm_workers(self.client, model, task_type.name, resources)  # no reload of a warm model
            for i, (data, offset) in enumerate(parts.parts):
                futures.append(self.client.submit(run_partition, data, spec, i, offset, pure=False,
                                                  key=f"bitinglip-{job_id}-{i}", resources=resources,
                                                  **prefer(warm, i)))
        final = None
        if out_dir is not None:
            import time

            final = self.client.submit(write_manifest, futures, spec, parts.total, time.time(),
                                       key=f"bitinglip-{job_id}-manifest", pure=False)
        job = Job(self, spec, futures, parts.rows(), final)
        self._jobs[job_id] = job
        return job

    def close(self) -> None:
        try:
            self.client.unsubscribe_topic(PROGRESS_TOPIC)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Platform {self.client.scheduler.address} workers={len(worker_resources(self.client))}>"


def _resolve(model: str) -> str:
    from bitinglip.platform.models import resolve_model
    from bitinglip.worker_plugins.models import get_model_plugin

    return resolve_model(model, get_model_plugin().settings).path


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
        cluster = local_cluster(settings, n_workers=n_workers, dashboard_address=dashboard_address)
        client = Client(cluster, **client_kwargs)
    else:
        client = Client(address, **client_kwargs)
    try:
        # an embedded cluster shares these settings; remote workers read their own environment
        client.register_plugin(ModelPlugin(list(preload), gpu_memory_fraction=settings.gpu_memory_fraction,
                                           settings=settings if cluster is not None else None))
    except Exception:
        client.close()
        if cluster is not None:
            cluster.close()
        raise
    return Platform(client, cluster, settings)
