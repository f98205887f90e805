"""The worker plugin that loads models and keeps them resident.

``ModelPlugin`` is cheap to pickle (it stores only names, numbers and the
settings); torch is imported and models are loaded in ``setup`` and on first
use, on the worker.  Tasks reach models through :func:`get_model_plugin`,
never through model objects in the task graph.

Before the first load of a registered version the plugin checks its files
against the sha256 manifest (again whenever a file's size or mtime
changes) and refuses pickle-based weights.  Loaded models stay resident
until the byte budget needs room; the least recently used one that no
running task holds is evicted.  Loads, verifications and evictions go to
the access log.

A generation engine that breaks (its loop died) is started again once, in
place, on the next use; one that breaks again marks the model broken on
this worker, and every later use gets a :class:`ModelBrokenError` naming
the worker and the reason instead of a dead engine's error.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin, get_worker

from bitinglip.errors import BitingLipError, IntegrityError, ModelBrokenError, ModelLoadError, PluginMissingError
from bitinglip.platform.cluster.dask_internals import worker_memory_limit, worker_resources_declared, worker_threads
from bitinglip.platform.models.access_log import AccessLog
from bitinglip.platform.models.integrity import FileVerifier, model_files, refuse_pickle
from bitinglip.platform.models.names import ModelRef, resolve_model
from bitinglip.platform.models.registry import Manifest, pin, read_manifest, unpin
from bitinglip.platform.models.residency import Entry, Residency
from bitinglip.platform.plugins.budgets import ReducedBudgets
from bitinglip.platform.tasks.batching import budget_record, calibrate_budget
from bitinglip.platform.tasks.builtin import Loaded, TaskType, get_task
from bitinglip.platform.tasks.calibration import Choice
from bitinglip.platform.tasks.precision import GPU_MODEL_SHARE, estimate_bytes, model_bytes, quantize_int8
from bitinglip.platform.tasks.threads import calibrate_threads, threads_record
from bitinglip.settings import Settings, get_settings

log = logging.getLogger(__name__)
PLUGIN_NAME = "bitinglip-models"
#: worker task states in which a task's thread may still use its model
RUNNING_STATES = frozenset({"executing", "long-running", "cancelled", "resumed"})
_USE = object()  # holder marker for ModelPlugin.use()
#: the automatic choices a resident model reports beside it (metrics, Jobs page; see resident_info)
RUNTIME_FIGURES = ("matmul_precision", "token_budget", "torch_threads")
#: times a broken engine is started again for one model on one worker before the model counts as broken there
ENGINE_RESTARTS = 1


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
                 gpu_memory_fraction: float = 0.9, settings: Settings | None = None) -> None:
        if torch_threads is not None and torch_threads < 1:
            raise ValueError("torch_threads must be at least 1")
        if not 0 < gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        self.preload = [(str(t), str(m)) for t, m in preload]
        self.torch_threads = torch_threads
        self.gpu_memory_fraction = gpu_memory_fraction
        self._settings = settings  # None: the worker reads its own environment
        self.device = "cpu"
        self.worker_address: str | None = None
        self._lock = threading.Lock()  # one load at a time
        self.residency = Residency(settings.cpu_model_budget_bytes if settings else 0,
                                   on_hold=self._pin, on_free=self._unpin)
        self.verifier = FileVerifier()
        self.load_seconds: dict[str, float] = {}
        self.load_counts: Counter[str] = Counter()
        self._access: AccessLog | None = None
        #: what running out of memory taught this worker (not pickled: each worker learns its own)
        self.budgets = ReducedBudgets()
        self.restarts: Counter[Hashable] = Counter()  # engine restarts per loaded key
        self.broken: dict[Hashable, str] = {}  # loaded key -> why its model is broken on this worker
        self.thread_share = 0  # the torch threads setup gave this worker (0: setup has not run)
        self.threads: Choice | None = None  # the thread count timed with the first model that times its budget

    def __getstate__(self) -> dict[str, Any]:
        return {"preload": self.preload, "torch_threads": self.torch_threads,
                "gpu_memory_fraction": self.gpu_memory_fraction, "settings": self._settings}

    @property
    def settings(self) -> Settings:
        return self._settings or get_settings()

    def engine_settings(self) -> dict[str, Any]:
        """The worker-side values a generation engine is sized by, as load options: the share of the GPU that
        :meth:`setup` gave torch, and the settings' KV cache and GPUs per worker."""
        return {"gpu_memory_fraction": self.gpu_memory_fraction, "kv_cache_bytes": self.settings.kv_cache_bytes,
                "gpus_per_worker": self.settings.gpus_per_worker}

    @property
    def access(self) -> AccessLog:
        if self._access is None:
            self._access = AccessLog(self.settings)
        return self._access

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per load in every worker's log is noise

        torch.set_num_threads(self.torch_threads or self.settings.torch_threads
                              or _torch_threads(worker_threads(worker)))
        self.thread_share = torch.get_num_threads()
        wants_gpu = worker_resources_declared(worker).get("GPU", 0) > 0
        if wants_gpu and torch.cuda.is_available():
            self.device = "cuda:0"  # the nanny pinned CUDA_VISIBLE_DEVICES to one device
            torch.cuda.set_per_process_memory_fraction(self.gpu_memory_fraction, 0)
            total = torch.cuda.get_device_properties(0).total_memory
            self.residency.budget_bytes = int(total * self.gpu_memory_fraction * GPU_MODEL_SHARE)
        else:
            self.residency.budget_bytes = self.settings.cpu_model_budget_bytes or _cpu_budget(worker)
        self.worker_address = worker.address
        for task, model in self.preload:
            self.get(get_task(task), model, get_task(task).check_options({}))

    def get(self, task: TaskType, model: str, options: Mapping[str, Any], holder: Hashable | None = None) -> Loaded:
        """The loaded model for ``task`` and ``model``, loading it on first use.

        ``holder`` is the key of the Dask task calling: the model is then held
        (never evicted, never removable) until that task stops executing.  The
        caller names itself because a worker has no public way to tell which
        task runs in a thread."""
        return self._acquire(task, model, options, holder).loaded

    def identity(self, model: str) -> str:
        """What decides the results of ``model`` here (result reuse keys on it): a registered
        version's sha256 with the registered settings that change outputs (dtype, pooling,
        max length), else the folder's weights and config by name, size and mtime."""
        ref = resolve_model(model, self.settings)
        manifest = read_manifest(ref.path) if ref.version else None
        if manifest is None:
            return f"files:{_files_identity(ref.path)}"
        return f"sha256:{manifest.sha256}|{manifest.dtype}|{manifest.pooling}|{manifest.max_length}"

    @contextmanager
    def use(self, task: TaskType, model: str, options: Mapping[str, Any]) -> Iterator[Loaded]:
        """Like :meth:`get`, holding the model for the ``with`` block."""
        entry = self._acquire(task, model, options, _USE)
        try:
            yield entry.loaded
        finally:
            self.residency.release(key=entry.key)

    def transition(self, key: Hashable, start: str, finish: str, **kwargs: Any) -> None:
        # runs on the worker's event loop for every task: keep it cheap
        if start in RUNNING_STATES and finish not in RUNNING_STATES and self.residency.holds_task(key):
            self.residency.release(task_key=key)

    def _acquire(self, task: TaskType, model: str, options: Mapping[str, Any], holder: Any) -> Entry:
        ref = resolve_model(model, self.settings)
        manifest = read_manifest(ref.path) if ref.version else None
        opts = dict(options)
        if manifest is not None and opts.get("dtype") == task.defaults.get("dtype"):
            opts["dtype"] = manifest.dtype  # the job did not choose: the registered dtype applies
        key = (task.name, ref.path, tuple((k, opts.get(k)) for k in task.load_options))
        with self._lock:
            if key in self.broken:
                raise ModelBrokenError(f"model {model!r} is broken on worker {self.worker_address}: "
                                       f"{self.broken[key]}")
            entry = self.residency.get(key)
            if entry is not None and _engine_broken(entry):
                self._restart(entry, model)
                entry = None
            if entry is None:
                entry = self._load(task, model, ref, manifest, opts, key)
            if holder is not None:
                self.residency.hold(key, None if holder is _USE else holder)
        return entry

    def _restart(self, entry: Entry, model: str) -> None:
        """With ``_lock`` held: close ``entry``'s broken engine so that a new one is loaded in its place (the
        new entry inherits its holds), or mark the model broken here when it was restarted already."""
        engine = entry.loaded.info.get("engine") if entry.loaded is not None else None
        why = (engine.failure if engine is not None else None) or "its generation loop stopped"
        self.restarts[entry.key] += 1
        log.error("the %s engine of %s broke (%s); restart %d of %d", getattr(engine, "name", "?"), model, why,
                  self.restarts[entry.key], ENGINE_RESTARTS)
        _close(entry)
        entry.nbytes = 0  # its engine is gone: nothing of it counts against the budget while the new one loads
        if self.restarts[entry.key] > ENGINE_RESTARTS:
            self.broken[entry.key] = (f"its generation engine broke again after {ENGINE_RESTARTS} restart(s) "
                                      f"(last: {why}); send its work to another worker")
            self.residency.drop(entry.key)
            raise ModelBrokenError(f"model {model!r} is broken on worker {self.worker_address}: "
                                   f"{self.broken[entry.key]}")

    def _threads(self, task: TaskType, loaded: Any, options: Mapping[str, Any], cache_dir: str,
                 model_id: str) -> Choice:
        """This worker's torch thread count: timed with the first model that times its token budget, then
        kept (torch has one count per process)."""
        if self.threads is None:
            import torch

            self.threads = calibrate_threads(task, loaded, options, self.thread_share or torch.get_num_threads(),
                                             self.torch_threads or self.settings.torch_threads, cache_dir, model_id)
        return self.threads

    def _load(self, task: TaskType, model: str, ref: ModelRef, manifest: Manifest | None,
              opts: dict[str, Any], key: Hashable) -> Entry:
        refuse_pickle(model_files(ref.path), self.settings.allow_pickle, f"model {model!r} at {ref.path}")
        if manifest is not None:
            try:
                hashed = self.verifier.ensure(ref.path, manifest.files)
            except IntegrityError as exc:
                self._log("verify", ref, manifest, ok=False, error=str(exc))
                raise
            if hashed:
                self._log("verify", ref, manifest, ok=True, files_hashed=len(hashed))
        if not self.residency.budget_bytes:
            self.residency.budget_bytes = _cpu_budget(None)
        weights = sum(os.path.getsize(Path(ref.path) / rel) for rel in model_files(ref.path)
                      if rel.endswith((".safetensors", ".bin", ".pt", ".pth")))
        dtype = str(opts.get("dtype") or "float32")
        self._evict(self.residency.victims(estimate_bytes(weights, _stored_dtype(ref.path), dtype)))
        import torch

        cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        before = torch.cuda.memory_allocated() if cuda else 0
        started = time.perf_counter()
        failure = None
        try:
            # where load-time calibrations (timed choices such as embed's matmul precision) keep their verdicts
            where = {"calibration_dir": str(Path(self.settings.model_cache_dir) / "calibration"),
                     "model_sha": manifest.sha256 if manifest else None,
                     # the registered cap on tokens: an engine that sizes its KV cache by it (vLLM) needs it now
                     "model_max_length": manifest.max_length if manifest else None,
                     # what an engine takes of this worker, from this plugin alone (a task reads no settings)
                     **self.engine_settings()}
            loaded = task.load(ref.path, self.device, {**opts, **where})
            if dtype == "int8":
                loaded.model = quantize_int8(loaded.model, self.device)
                # a fast path built in load (Embed's packed encoder) holds the float32 layers
                loaded.info.pop("packed", None)
            if task.times_budget:  # timed here, after quantizing: on the model that jobs will run
                threads = self._threads(task, loaded, {**task.defaults, **opts}, where["calibration_dir"],
                                        where["model_sha"] or ref.path)
                loaded.info.setdefault("runtime", {}).update(threads_record(threads))
                budget = calibrate_budget(task, loaded, {**task.defaults, **opts}, self.settings.token_budget,
                                          where["calibration_dir"], where["model_sha"] or ref.path)
                loaded.info["token_budget"] = int(budget.value)
                loaded.info.setdefault("runtime", {}).update(budget_record(budget))
        except BitingLipError:
            raise
        except Exception as exc:
            # the whole story for whoever turns the worker's log up; the user gets one line
            log.debug("loading model %r for task %r failed", model, task.name, exc_info=True)
            failure = f"loading model {model!r} for task {task.name!r} failed: {one_line(exc)}"
        if failure is not None:
            # raised outside the except block, so with no __cause__ or __context__: Dask pickles an error's
            # chain (tblib), and a library's exception may not pickle (vLLM's config errors are pydantic
            # ValidationErrors holding an ArgsKwargs: "cannot pickle", a traceback logged per attempt)
            raise ModelLoadError(failure)
        seconds = time.perf_counter() - started
        engine = loaded.info.get("engine")
        if engine is not None:  # weights and KV cache, which the engine allocated its own way
            nbytes = engine.nbytes()
        else:
            nbytes = torch.cuda.memory_allocated() - before if cuda else model_bytes(loaded.model)
        if manifest is not None:
            if manifest.max_length:
                loaded.max_length = min(loaded.max_length, manifest.max_length)
            if manifest.pooling and "pooling" in loaded.info:
                loaded.info["pooling"] = manifest.pooling
        entry = Entry(key, loaded, int(nbytes), model, task.name, dtype, ref.path, ref.version,
                      manifest.sha256 if manifest else None)
        self.residency.add(entry)
        self._evict(self.residency.victims(0, keep=key))
        self.load_seconds[model] = seconds
        self.load_counts[model] += 1
        log.info("loaded %s for %s (%s) in %.2fs on %s: %.1f MB", model, task.name, dtype, seconds, self.device,
                 nbytes / 1e6)
        if self.residency.total_bytes > self.residency.budget_bytes:
            log.warning("resident models take %d bytes, over the budget of %d: the others are in use",
                        self.residency.total_bytes, self.residency.budget_bytes)
        self._log("load", ref, manifest, task=task.name, dtype=dtype, seconds=round(seconds, 3), bytes=int(nbytes),
                  device=self.device)
        return entry

    def _evict(self, victims: Sequence[Entry]) -> None:
        evicted = [e for e in victims if self.residency.pop(e.key) is not None]
        for entry in evicted:
            log.info("evicting %s (%s, %.1f MB) to make room", entry.model, entry.task, entry.nbytes / 1e6)
            self.access.append("evict", _base(entry.model), entry.version, entry.sha256, actor="bitinglip-worker",
                               worker=self.worker_address, task=entry.task, dtype=entry.dtype, bytes=entry.nbytes)
            _close(entry)
        if evicted:
            gc.collect()
            import torch

            if self.device.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _pin(self, entry: Entry) -> None:
        if entry.version is not None:
            entry.pin_fd = pin(entry.path)

    def _unpin(self, entry: Entry) -> None:
        if entry.pin_fd is not None:
            fd, entry.pin_fd = entry.pin_fd, None
            unpin(fd)

    def _log(self, event: str, ref: ModelRef, manifest: Manifest | None, **detail: Any) -> None:
        self.access.append(event, _base(ref.name), ref.version, manifest.sha256 if manifest else None,
                           actor="bitinglip-worker", worker=self.worker_address, **detail)

    def resident(self) -> list[str]:
        return [f"{e.task}:{e.model}" for e in self.residency.entries()]

    def resident_info(self) -> list[dict[str, Any]]:
        """What is loaded here, least recently used first (for placement and admins)."""
        return [{"task": e.task, "model": e.model, "dtype": e.dtype, "version": e.version, "path": e.path,
                 "bytes": e.nbytes, "held": e.held, **_runtime_info(e), **_engine_info(e)}
                for e in self.residency.entries()]

    def teardown(self, worker: Any) -> None:
        for entry in self.residency.clear():
            _close(entry)
            self._unpin(entry)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


def one_line(exc: BaseException) -> str:
    """``exc`` as one line that names the cause: a pydantic ValidationError
    (vLLM's config checks) by its messages, without the input it validated."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        try:
            text = "; ".join(str(e.get("msg", "")) for e in errors(include_input=False, include_url=False))
        except Exception:  # noqa: BLE001 - another library's errors(): its str() below
            text = ""
        if text:
            return f"{type(exc).__name__}: {' '.join(text.split())}"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _runtime_info(entry: Entry) -> dict[str, Any]:
    """The automatic choices the model runs with (its matmul precision, its token budget, its worker's torch
    threads), for metrics and the Jobs page."""
    runtime = entry.loaded.info.get("runtime", {}) if entry.loaded is not None else {}
    return {k: runtime[k] for k in RUNTIME_FIGURES if isinstance(runtime.get(k), str | int)}


def _engine_info(entry: Entry) -> dict[str, Any]:
    """A generation engine's name and figures (KV cache, requests in flight), for metrics."""
    engine = entry.loaded.info.get("engine") if entry.loaded is not None else None
    if engine is None:
        return {}
    return {"engine": engine.name, **{k: float(v) for k, v in engine.stats().items()}}


def _engine_broken(entry: Entry) -> bool:
    engine = entry.loaded.info.get("engine") if entry.loaded is not None else None
    return bool(engine is not None and engine.broken)


def _close(entry: Entry) -> None:
    """Free what ``entry`` holds beyond its weights (a generation engine), then drop it."""
    loaded, entry.loaded = entry.loaded, None
    if loaded is not None:
        try:
            loaded.close()
        except Exception:
            log.exception("closing %s (%s) failed", entry.model, entry.task)


def _torch_threads(nthreads: int) -> int:
    """Intra-op threads per task: OMP_NUM_THREADS when the launcher set it
    (dask's nanny sets 1 unless told otherwise), else the cores shared out
    among the worker's task threads."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, nthreads))


def _cpu_budget(worker: Any) -> int:
    """Half the worker's memory limit (or of the machine's memory)."""
    limit = worker_memory_limit(worker)
    if not limit:
        import psutil

        limit = psutil.virtual_memory().total
    return int(limit) // 2


def _stored_dtype(path: str) -> str | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("torch_dtype") or config.get("dtype")
    return value if isinstance(value, str) else None


def _base(model: str) -> str:
    return model.partition("@")[0]


def _files_identity(path: str) -> str:
    """An unregistered model folder's files by path, size and mtime in nanoseconds (hashing
    gigabytes per partition would cost more than the rows it saves)."""
    import hashlib

    root = Path(path).resolve()
    parts = [str(root)]
    for rel in sorted(model_files(str(root))):
        st = (root / rel).stat()
        parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


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
            "or register bitinglip.platform.plugins.ModelPlugin() on the cluster")
    return plugin  # type: ignore[return-value]
