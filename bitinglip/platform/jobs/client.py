"""The Platform that ``bitinglip.connect()`` gives (:mod:`bitinglip.platform.connect`).

::

    import bitinglip

    with bitinglip.connect() as platform:          # embedded local cluster
        job = platform.submit("embed", model="all-MiniLM-L6-v2", inputs=["a", "b"])
        job.progress()
        df = job.result()

    platform = bitinglip.connect("tcp://scheduler:8786")   # an existing cluster
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
from distributed import Event

from bitinglip.errors import InputError, NoGPUWorkersError, UnavailableError, UnknownModelError
from bitinglip.platform.cluster.dask_internals import cancel_wanted, held_for_good, scheduler_holds_none
from bitinglip.platform.cluster.local import worker_resources
from bitinglip.platform.jobs.inputs import Partitions, RowShape, to_partitions
from bitinglip.platform.jobs.job import Job
from bitinglip.platform.jobs.outputs import (
    RECORD,
    claim,
    committed_parts,
    committed_summary,
    fingerprint,
    read_json,
    write_manifest,
)
from bitinglip.platform.jobs.placement import prefer, warm_workers
from bitinglip.platform.jobs.reuse import DEFAULT_TENANT, ReuseSpec, default_reuse
from bitinglip.platform.jobs.runner import run_partition
from bitinglip.platform.jobs.spec import (
    MAX_PARTITION_ROWS,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
    MAX_TOKEN_BUDGET,
    JobRecord,
    JobSpec,
    WorkerSettings,
    checked,
    read_record,
)
from bitinglip.platform.jobs.vocabulary import (
    JOB_ID,
    MANIFEST_PART,
    PROGRESS_TOPIC,
    cancel_event_name,
    job_keys,
    new_job_id,
    task_key,
)
from bitinglip.platform.models.names import PACKAGED_MODELS, resolve_model
from bitinglip.platform.models.registry import Registry, is_ref
from bitinglip.platform.tasks.builtin import TaskType, check_task_type, get_task
from bitinglip.platform.tasks.contract import DEFAULT_PRIORITY
from bitinglip.platform.tasks.options import is_whole, job_priority, job_text_column, surrogate_at
from bitinglip.polling import poll
from bitinglip.settings import Settings, get_settings

if TYPE_CHECKING:
    from typing_extensions import Self

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
        job = self._jobs.get(str(msg.get("job"))) if isinstance(msg, dict) else None
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
               fail_fast: bool = False, retries: int = 0, timeout: float | None = None,
               input_root: str | os.PathLike[str] | None = None, reuse: bool | None = None,
               tenant: str | None = None, priority: int | None = None, **task_options: Any) -> Job:
        """Run ``task`` with ``model`` over ``inputs`` and return the :class:`Job`.

        ``inputs``: a list of strings, a pandas DataFrame or Series, a dask
        DataFrame, or a Parquet/JSONL/CSV path (``text_column`` names the
        text; an ``id`` column, if any, is kept).  ``output``: a directory for
        Parquet results, one file per partition plus a manifest; submitting
        again with the same ``job_id`` (an idempotency key) and output runs
        only the partitions not yet committed.  ``gpu``: True demands GPU
        workers, False keeps to any worker, None uses GPUs when the cluster
        has them.  A bad row goes to ``job.errors()`` and the job goes on,
        unless ``fail_fast``.  ``retries``: further attempts for a partition
        that raised; ``timeout``: seconds before the job stops.  Task options
        go in ``options`` or as keywords (``normalize=True``).  ``input_root``:
        a path input must lie inside this folder, and so must every file of a
        directory input once its links are resolved (the gateway passes
        ``BITINGLIP_INPUT_DIR``).  ``reuse``: take rows an earlier job of the
        same ``tenant`` computed with the same model, task and options from the
        workers' result store (``BITINGLIP_REUSE_DIR``) and run only the others;
        None (the default) reuses for deterministic settings (embed, classify,
        greedy or seeded generation), and sampled rows without a seed are never
        reused.  ``tenant``: whose results these are (the gateway passes the
        token's subject; None: ``"local"``).  ``priority``: 1 to 10, higher
        runs first among bulk jobs (None: 5, the REST API's default); a resume
        keeps it.
        """
        resubmit = ((task, model, inputs), dict(
            output=output, text_column=text_column, options=options, gpu=gpu, partition_rows=partition_rows,
            token_budget=token_budget, fail_fast=fail_fast, retries=retries, timeout=timeout,
            input_root=input_root, reuse=reuse, tenant=tenant, priority=priority, **task_options))
        task_type = get_task(task, self.tasks)
        if options is not None and not isinstance(options, Mapping):
            raise InputError(f"options={options!r:.60}: expected a mapping of option names to values")
        merged = task_type.check_options({**(options or {}), **task_options})
        _check_arguments(partition_rows=partition_rows, token_budget=token_budget, retries=retries,
                         timeout=timeout, job_id=job_id, text_column=text_column, gpu=gpu, fail_fast=fail_fast,
                         priority=priority)
        priority = DEFAULT_PRIORITY if priority is None else priority
        reuse_spec = self._reuse(task_type.name, merged, reuse, tenant)
        use_gpu = self._placement(gpu)
        resources = {"GPU": 1} if use_gpu else None
        model, model_dir, model_version = self._locate_model(model, use_gpu)
        merged = task_type.check_model_options(merged, model_dir)
        job_id = job_id or new_job_id()
        resubmit[1]["job_id"] = job_id
        rows_wanted = partition_rows or self.settings.partition_rows
        record = None
        out_dir = os.path.abspath(os.fspath(output)) if output is not None else None
        if out_dir is not None:
            previous = read_json(os.path.join(out_dir, RECORD))
            if previous is not None and previous.get("job_id") == job_id:
                rows_wanted = int(previous["partition_rows"])  # same boundaries as before
        workers = max(1, len(self.gpu_workers()) if use_gpu else len(worker_resources(self.client)))
        shape = RowShape(task_type.input_columns, task_type.text_alternatives,
                         lambda text, extra, row_id: task_type.check_row(text, extra, row_id, merged))
        with dask.annotate(priority=priority):  # a lazy input's row counts run at the job's priority too
            parts = to_partitions(inputs, text_column, workers, self.client, rows_wanted, check_rows=fail_fast,
                                  min_rows=task_type.min_partition_rows, root=input_root, shape=shape)
        # the client's settings that decide a partition's work travel with it: every worker runs the job alike
        worker = WorkerSettings.from_settings(self.settings, token_budget=token_budget)
        spec = checked(JobSpec, {
            "job_id": job_id, "task": task_type, "model": model, "options": merged, "text_column": text_column,
            "output": out_dir, "fail_fast": fail_fast, "retries": retries, "timeout": timeout,
            "priority": priority,
            "deadline": time.time() + timeout if timeout else None, "reuse": reuse_spec, "worker": worker}, "the job")
        done: set[int] = set()
        if out_dir is not None:
            # everything a resume needs, so that ``resume(out_dir)`` alone reruns the same spec
            record = claim(out_dir, JobRecord.of(
                spec, model_version=model_version, gpu=gpu,
                input_root=os.fspath(input_root) if input_root is not None else None,
                input=os.path.abspath(os.fspath(inputs)) if isinstance(inputs, (str, os.PathLike)) else None,
                fingerprint=fingerprint(inputs), partition_rows=parts.size, partitions=len(parts.parts),
                rows=parts.total, submitted=time.time()).model_dump(mode="json"))
            done = committed_parts(out_dir, len(parts.parts))
        superseded = self._jobs.get(job_id)
        if superseded is not None:  # a resume: the new run's futures take over the keys
            self._release(superseded._all_futures())
        Event(cancel_event_name(job_id), client=self.client).clear()  # a resumed job starts uncancelled
        final = None
        with dask.annotate(priority=spec.priority):  # every task of the job: its partitions and its manifest
            futures = self._submit_partitions(spec, parts, done, resources)
            if out_dir is not None and record is not None:
                final = self.client.submit(write_manifest, futures, out_dir, record, pure=False,
                                           key=task_key(job_id, MANIFEST_PART))
        job = Job(self, spec, futures, parts.rows(), final, record, resubmit)
        self._jobs[job_id] = job
        return job

    def _reuse(self, task: str, options: Mapping[str, Any], reuse: bool | None, tenant: str | None
               ) -> ReuseSpec | None:
        """Where the job's partitions look up and keep results; None when the job reuses nothing."""
        if not (reuse is None or isinstance(reuse, bool)):
            raise InputError(f"reuse={reuse!r:.60}: expected True, False or None")
        if tenant is not None and (not isinstance(tenant, str) or not 0 < len(tenant) <= 200
                                   or surrogate_at(tenant) is not None):
            raise InputError(f"tenant={tenant!r:.60}: expected a name of 1 to 200 characters")
        wanted = default_reuse(task, options) if reuse is None else reuse
        # injected faults are there to exercise the compute path: a stored row would skip it
        if not wanted or _faults(self.settings):
            return None
        return ReuseSpec(tenant or DEFAULT_TENANT)

    def _locate_model(self, model: str, use_gpu: bool) -> tuple[str, str | None, str | None]:
        """The model reference the workers get, checked here and now: a name
        (registered, packaged, under ``MODEL_CACHE_DIR``) stays the name, so
        the worker verifies the registered version; a directory becomes its
        absolute path, as input paths do, so a worker with another working
        directory loads the same folder.  Resolved in this process, not in a
        task, which would wait behind every busy worker; a cluster of our own
        sees the same files, a remote one is asked through one worker.

        Returns the reference, the model's directory here (None when only a
        worker sees it) and its registry version (None when unregistered)."""
        try:
            ref = resolve_model(model, self.settings)
        except UnknownModelError:
            if self.cluster is not None:
                raise
            return self._ask_a_worker(_worker_reference(model), use_gpu), None, None
        named = model in PACKAGED_MODELS or ref.version is not None or \
            ref.path != str(Path(model).expanduser().resolve())
        return (model if named else ref.path), ref.path, ref.version

    def _ask_a_worker(self, model: str, use_gpu: bool) -> str:
        """Resolve ``model`` on one worker with ``Client.run``, which runs
        beside the worker's tasks rather than queueing behind them."""
        from concurrent.futures import ThreadPoolExecutor
        from concurrent.futures import TimeoutError as FutureTimeout

        addresses = self.gpu_workers() if use_gpu else list(worker_resources(self.client))
        if not addresses:
            raise UnavailableError(f"no worker to look up model {model!r} on; the cluster has none")
        pool = ThreadPoolExecutor(1)
        try:
            answer = pool.submit(self.client.run, _resolve_on_worker, model, workers=addresses[:1])
            found, text = next(iter(answer.result(timeout=self.settings.model_lookup_timeout_s).values()))
        except FutureTimeout:
            raise UnavailableError(f"a worker did not answer within {self.settings.model_lookup_timeout_s:g} s where model "
                                   f"{model!r} is") from None
        finally:
            pool.shutdown(wait=False)
        if not found:
            raise UnknownModelError(text)
        return model

    def detach(self, job: Job, timeout: float = 60.0) -> None:
        """Let ``job`` run to its end without this client (``fire_and_forget``),
        and return only once the scheduler holds it: a Dask client sends graphs
        and wishes in batches a few milliseconds later, so a process that dies
        just after ``fire_and_forget`` could lose the job it has promised."""
        from distributed import fire_and_forget

        futures = job._all_futures()
        fire_and_forget(futures)
        if not self._until_scheduler(held_for_good, [f.key for f in futures], timeout, 0.005):
            raise UnavailableError(f"the scheduler did not take job {job.id} within {timeout:.0f} s")

    def _until_scheduler(self, check: Any, keys: list[Any], timeout: float, step: float) -> bool:
        """Poll ``check(keys)`` on the scheduler until it holds; False at the deadline."""
        return poll(lambda: self.client.run_on_scheduler(check, keys), timeout=timeout, interval=step)

    def _release(self, futures: list[Any], timeout: float = 10.0) -> None:
        """Forget an earlier run's futures, and wait until the scheduler has,
        so that a rerun under the same keys starts clean."""
        self.client.cancel(futures, force=True)
        self._until_scheduler(scheduler_holds_none, [f.key for f in futures], timeout, 0.05)

    def _placement(self, gpu: bool | None) -> bool:
        gpu_addrs = self.gpu_workers()
        if gpu and not gpu_addrs:
            workers = len(worker_resources(self.client))
            raise NoGPUWorkersError(
                f"the job asks for GPUs but none of the cluster's {workers} workers has the GPU resource; "
                "start workers with `dask worker ADDRESS --resources GPU=1` or submit with gpu=False")
        return bool(gpu_addrs) if gpu is None else gpu

    def _submit_partitions(self, spec: JobSpec, parts: Partitions, done: set[int],
                           resources: Mapping[str, float] | None) -> list[Any]:
        from dask import delayed

        futures: list[Any] = []
        warm = warm_workers(self.client, spec.model, spec.task.name, resources)  # no reload of a warm model
        for i, (data, offset) in enumerate(parts.parts):
            key = task_key(spec.job_id, i)
            if i in done:  # committed by an earlier run: only read its figures
                futures.append(self.client.submit(committed_summary, spec.output, i, spec.job_id, key=key,
                                                  pure=False))
            elif parts.lazy:
                futures.append(self.client.compute(delayed(run_partition)(data, spec, i, offset, dask_key_name=key),
                                                   resources=resources))
            else:
                futures.append(self.client.submit(run_partition, data, spec, i, offset, pure=False, key=key,
                                                  resources=resources, **prefer(warm, i)))
        return futures

    def cancel_job(self, job_id: str, parts: int, output: str | os.PathLike[str] | None = None,
                   reason: str = "cancelled") -> None:
        """Cancel a job by its id, also one this client did not submit (a
        REST job, fire-and-forget): running partitions stop at their next
        micro-batch, queued ones never start, and its output, if any, gets a
        partial manifest saying so."""
        from bitinglip.platform.jobs.outputs import write_partial_manifest

        Event(cancel_event_name(job_id), client=self.client).set()
        # for every client (fire_and_forget made the scheduler itself want these keys), and only the keys still
        # wanted: a partition that has just ended is known but wanted by no one (see cancel_wanted)
        self.client.run_on_scheduler(cancel_wanted, job_keys(job_id, parts), self.client.id, reason)
        out_dir = os.fspath(output) if output else None
        record = read_json(os.path.join(out_dir, RECORD)) if out_dir else None
        if out_dir and record is not None:  # the output says so too: the job's end survives a loss of Redis
            write_partial_manifest(out_dir, record, "cancelled")

    def resume(self, output: str | os.PathLike[str], inputs: Any = None, **kwargs: Any) -> Job:
        """Resume the job whose results are in ``output``: only partitions not
        committed there run, with the spec the job recorded in ``_job.json``
        (:class:`~bitinglip.platform.jobs.spec.JobRecord`: text column,
        options, partitioning, token budget, fail_fast, retries, timeout,
        placement, reuse); ``kwargs`` override them.  ``inputs`` defaults to
        the input path that the job recorded (in-memory inputs must be given
        again)."""
        out_dir = os.path.abspath(os.fspath(output))
        record = read_record(out_dir, self.tasks)
        inputs = inputs if inputs is not None else record.input
        if inputs is None:
            raise InputError(f"the job in {out_dir} had in-memory inputs: pass them again as inputs=")
        model = record.model
        if record.model_version and "@" not in model:  # the same registry version, not a newer one
            model = f"{model}@{record.model_version}"
        return self.submit(record.task, model, inputs, output=out_dir, job_id=record.job_id,
                           **{**record.resubmission(), **kwargs})

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing anyway
            self.client.unsubscribe_topic(PROGRESS_TOPIC)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Platform {self.client.scheduler.address} workers={len(worker_resources(self.client))}>"


def _check_arguments(**values: Any) -> None:
    for name, high in (("partition_rows", MAX_PARTITION_ROWS), ("token_budget", MAX_TOKEN_BUDGET)):
        v = values[name]
        if v is not None and not is_whole(v, 1, high):
            raise InputError(f"{name}={v!r:.60}: expected a whole number from 1 to {high}")
    r = values["retries"]
    if not is_whole(r, 0, MAX_RETRIES):
        raise InputError(f"retries={r!r:.60}: expected a whole number from 0 to {MAX_RETRIES}")
    t = values["timeout"]
    # NaN compares false with everything and inf never comes: neither would ever stop the job
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                          or not 0 < t <= MAX_TIMEOUT_S):
        raise InputError(f"timeout={t!r:.60}: expected a finite number of seconds above 0, "
                         f"at most {MAX_TIMEOUT_S:.0f}")
    j = values["job_id"]
    if j is not None and (not isinstance(j, str) or not JOB_ID.fullmatch(j)):
        raise InputError(f"job_id={j!r:.60}: expected 1 to 128 letters, digits, '_', '.' or '-'")
    job_text_column(values["text_column"])
    if values["priority"] is not None:
        job_priority(values["priority"])
    for name in ("gpu", "fail_fast"):
        if not (isinstance(values[name], bool) or (name == "gpu" and values[name] is None)):
            raise InputError(f"{name}={values[name]!r:.60}: expected True or False")


def _faults(settings: Settings) -> dict[str, Any]:
    """Faults the runner injects: set by tests through the settings, never by a caller of submit."""
    return WorkerSettings.from_settings(settings).faults


def _worker_reference(model: str) -> str:
    """What to ask a remote worker for: a relative directory path made
    absolute here, as input paths are; names as they are."""
    if model in PACKAGED_MODELS or is_ref(model) or not model.strip():
        return model
    return os.path.abspath(os.path.expanduser(model))


def _resolve_on_worker(model: str, dask_worker: Any = None) -> tuple[bool, str]:
    """On a worker, through ``Client.run``: (True, its path) or (False, why
    not), so that an unknown model is one clear error on the client, not a
    worker's traceback."""
    from bitinglip.platform.plugins.model_plugin import PLUGIN_NAME

    plugin = dask_worker.plugins.get(PLUGIN_NAME) if dask_worker is not None else None
    try:
        return True, resolve_model(model, plugin.settings if plugin is not None else get_settings()).path
    except UnknownModelError as exc:
        return False, str(exc)


