"""The worker plugin that loads models and keeps them resident.

``ModelPlugin`` is cheap to pickle (it stores only names and numbers); torch
is imported and models are loaded in ``setup`` and on first use, on the
worker.  Tasks reach models through :func:`get_model_plugin`, never through
model objects in the task graph.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from distributed import WorkerPlugin, get_worker

from bitinglip.platform.errors import ModelLoadError, PluginMissingError
from bitinglip.platform.models import resolve_model
from bitinglip.platform.tasks import Loaded, TaskType, get_task

log = logging.getLogger(__name__)
PLUGIN_NAME = "bitinglip-models"


class ModelPlugin(WorkerPlugin):
    """Loads models on a worker, keeps them, frees them on teardown.

    ``preload`` lists ``(task, model)`` pairs loaded in ``setup``;
    ``torch_threads`` is the intra-op thread count per task (None: the
    worker's cores divided by its task threads); ``gpu_memory_fraction`` caps
    the share of its GPU that this worker's process may allocate.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, preload: Sequence[tuple[str, str]] = (), torch_threads: int | None = None,
                 gpu_memory_fraction: float = 0.9) -> None:
        if torch_threads is not None and torch_threads < 1:
            raise ValueError("torch_threads must be at least 1")
        if not 0 < gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        self.preload = [(str(t), str(m)) for t, m in preload]
        self.torch_threads = torch_threads
        self.gpu_memory_fraction = gpu_memory_fraction
        self.device = "cpu"
        self._models: OrderedDict[tuple[Any, ...], Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self.load_seconds: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"preload": self.preload, "torch_threads": self.torch_threads,
                "gpu_memory_fraction": self.gpu_memory_fraction}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        import torch

        torch.set_num_threads(self.torch_threads or _torch_threads(int(worker.state.nthreads)))
        wants_gpu = worker.state.total_resources.get("GPU", 0) > 0
        if wants_gpu and torch.cuda.is_available():
            self.device = "cuda:0"  # the nanny pinned CUDA_VISIBLE_DEVICES to one device
            torch.cuda.set_per_process_memory_fraction(self.gpu_memory_fraction, 0)
        for task, model in self.preload:
            self.get(get_task(task), model, get_task(task).check_options({}))

    def get(self, task: TaskType, model: str, options: Mapping[str, Any]) -> Loaded:
        """The loaded model for ``task`` and ``model``, loading it on first use."""
        key = (task.name, model, tuple((k, options.get(k)) for k in task.load_options))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            ref = resolve_model(model)
            started = time.perf_counter()
            try:
                loaded = task.load(ref.path, self.device, options)
            except Exception as exc:
                raise ModelLoadError(f"loading model {model!r} for task {task.name!r} failed: {exc}") from exc
            self.load_seconds[model] = time.perf_counter() - started
            log.info("loaded %s for %s in %.2fs on %s", model, task.name, self.load_seconds[model], self.device)
            self._models[key] = loaded
            return loaded

    def resident(self) -> list[str]:
        return [f"{task}:{model}" for task, model, _ in self._models]

    def teardown(self, worker: Any) -> None:
        self._models.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


def _torch_threads(nthreads: int) -> int:
    """Intra-op threads per task: OMP_NUM_THREADS when the launcher set it
    (dask's nanny sets 1 unless told otherwise), else the cores shared out
    among the worker's task threads."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, nthreads))


def get_model_plugin() -> ModelPlugin:
    """The model plugin of the worker running this task, or a clear error."""
    try:
        worker = get_worker()
    except ValueError as exc:
        raise PluginMissingError("get_model_plugin() must be called inside a task on a Dask worker") from exc
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None:
        raise PluginMissingError(
            f"worker {worker.address} has no {PLUGIN_NAME!r} plugin; connect with bitinglip.connect() "
            "or register bitinglip.worker_plugins.ModelPlugin() on the cluster")
    return plugin  # type: ignore[return-value]
