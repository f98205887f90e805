"""A job's contract: what it runs and with what, declared once and typed.

:class:`JobSpec` is built once, by :meth:`Platform.submit
<bitinglip.platform.jobs.client.Platform.submit>`, and every partition gets it
(pickled with its task, so it stays small: names, numbers and the options,
never a model).  :class:`WorkerSettings`, inside it, carries the client's
settings that decide a partition's work, so every worker runs the job alike
whatever its own environment says.  What belongs to a worker rather than to a
job stays with its model plugin (its share of the GPU, its KV cache, its
model budget and the result store on its disk): one engine and one store
serve every job on a worker, so a job cannot size them.

:class:`JobRecord` is ``_job.json``: the spec's ``model_dump`` and what the
submission found (the input's fingerprint and partitioning).
:func:`read_record` reads it back with ``model_validate``, so a resume runs the
same spec again, and a record with a bad field is refused naming the field.

::

    spec = JobSpec(job_id="j1", task="embed", model="all-MiniLM-L6-v2", options={"normalize": True})
    spec.task.name, spec.options["normalize"], spec.worker.token_budget    # ('embed', True, 0)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from bitinglip.errors import ConfigError, InputError
from bitinglip.platform.jobs.outputs import RECORD, read_json
from bitinglip.platform.jobs.reuse import DEFAULT_TENANT, ReuseSpec
from bitinglip.platform.jobs.vocabulary import JOB_ID
from bitinglip.platform.tasks.builtin import BUILTIN_TASKS, TaskType, get_task
from bitinglip.platform.tasks.contract import TASK_OPTIONS, JobFields
from bitinglip.platform.tasks.options import job_text_column
from bitinglip.settings import Settings

#: bounds of submit's own arguments: each reaches the wire, so each is finite and plain
MAX_PARTITION_ROWS = MAX_TOKEN_BUDGET = 100_000_000
MAX_RETRIES = 100
MAX_TIMEOUT_S = 365 * 24 * 3600.0


def _job_id(value: str) -> str:
    if not JOB_ID.fullmatch(value):
        raise ValueError(f"{value!r:.60}: expected 1 to 128 letters, digits, '_', '.' or '-'")
    return value


def _task(value: Any, info: ValidationInfo) -> TaskType:
    """A task type, or a task's name: a built-in one or one in ``context["tasks"]`` (a platform's
    registered tasks); an unknown name raises :class:`UnknownTaskError` as ``submit`` does."""
    if isinstance(value, TaskType):
        return value
    if not isinstance(value, str):
        # a ValueError, which pydantic reports as this field's error (a TypeError would escape it)
        raise ValueError(f"expected a task's name, got {type(value).__name__}")  # noqa: TRY004
    return get_task(value, (info.context or {}).get("tasks"))


Task = Annotated[TaskType, PlainValidator(_task), PlainSerializer(lambda task: task.name, return_type=str),
                 WithJsonSchema({"type": "string", "description": "the task's name"})]
TextColumn = Annotated[str, AfterValidator(job_text_column)]


def _described(name: str, **bounds: Any) -> Any:
    """A field named and described as its :class:`Settings` field is (``bounds``: the job's own)."""
    setting = Settings.model_fields[name]
    return Field(setting.default, description=setting.description, **bounds)


class WorkerSettings(BaseModel):
    """The client's settings that decide how a partition runs, whichever worker runs it
    (each field is the :class:`Settings` field of its name)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_budget: int = _described("token_budget", ge=0, le=MAX_TOKEN_BUDGET)
    #: tests only: a micro-batch above this many tokens raises MemoryError on the worker
    fault_oom_above_tokens: int = _described("fault_oom_above_tokens", ge=0)

    @classmethod
    def from_settings(cls, settings: Settings, **given: Any) -> WorkerSettings:
        """The values of ``settings``, with those of ``given`` that are not None over them
        (``submit(token_budget=...)``); :class:`ConfigError` for a setting past a job's bound."""
        values = {name: getattr(settings, name) for name in cls.model_fields}
        try:
            return cls(**{**values, **{k: v for k, v in given.items() if v is not None}})
        except ValidationError as exc:
            raise ConfigError(f"the settings do not fit a job: {_reasons(exc)}") from None

    @property
    def faults(self) -> dict[str, int]:
        """The faults the runner injects (:func:`~bitinglip.platform.jobs.runner.predict_rows`)."""
        return {"oom_above_tokens": self.fault_oom_above_tokens} if self.fault_oom_above_tokens else {}


class JobSpec(BaseModel):
    """Everything a partition needs to know about its job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: Annotated[str, AfterValidator(_job_id)]
    task: Task
    model: str = Field(min_length=1, description="what the workers load: a name, name@version or a folder")
    #: every option of the task, checked and merged with its defaults
    options: dict[str, Any] = Field(default_factory=dict)
    text_column: TextColumn = JobFields.model_fields["text_column"].default
    #: the folder the partitions are written to; None: the results come back in memory
    output: str | None = None
    #: the Dask priority of the job's tasks among bulk jobs (the REST API's field, bounded alike)
    priority: int = JobFields.model_fields["priority"]
    #: the first bad row fails the job (default: it goes to the errors table)
    fail_fast: bool = False
    #: attempts after the first for a partition that raised (worker deaths are Dask's to retry)
    retries: int = Field(0, ge=0, le=MAX_RETRIES)
    #: seconds the job may run, from its submission (a resume starts them again)
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    #: wall-clock time (epoch seconds) after which the job stops: submission + timeout
    deadline: float | None = Field(None, allow_inf_nan=False)
    #: where earlier results are looked up and new ones kept (:mod:`.reuse`); None: every row runs
    reuse: ReuseSpec | None = None
    worker: WorkerSettings = WorkerSettings()

    @field_validator("options")
    @classmethod
    def _options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """A built-in task's options as its option model types them (a record's lists are
        tuples again); a task of the user's own checks its options itself, at submit."""
        task = info.data.get("task")
        model = TASK_OPTIONS.get(task.name) if isinstance(task, TaskType) else None
        if model is None or type(task) is not type(BUILTIN_TASKS[task.name]):
            return options
        try:
            checked = model.model_validate(options)
        except ValidationError as exc:
            raise ValueError(_reasons(exc)) from None
        return {name: getattr(checked, name) for name in options}


class JobRecord(JobSpec):
    """``_job.json``: the job's spec and what its submission found, so that a resume reruns the
    same spec over the same partitions (the gateway's rebuild and the finished job's manifest
    read it too)."""

    # a field a later version adds does not stop this one from resuming the job
    model_config = ConfigDict(extra="ignore")

    #: the registry version that ran (None: an unregistered model); a resume pins it
    model_version: str | None = None
    gpu: bool | None = None
    #: the folder a path input had to lie in
    input_root: str | None = None
    #: the input path (None: in-memory inputs, which a resume must be given again)
    input: str | None = None
    fingerprint: str = Field(min_length=1)
    partition_rows: int = Field(ge=1)
    partitions: int = Field(ge=0)
    rows: int = Field(ge=0)
    submitted: float

    @model_validator(mode="before")
    @classmethod
    def _earlier_layout(cls, record: Any) -> Any:
        """A record of an earlier version: ``token_budget`` (submit's argument) at the top, and
        ``reuse`` a flag beside ``tenant``."""
        if not isinstance(record, Mapping):
            return record
        record = dict(record)
        if "worker" not in record and "token_budget" in record:
            record["worker"] = {"token_budget": record.pop("token_budget") or 0}
        if isinstance(record.get("reuse"), bool):
            record["reuse"] = {"tenant": record.get("tenant") or DEFAULT_TENANT} if record["reuse"] else None
        return record

    @classmethod
    def of(cls, spec: JobSpec, **facts: Any) -> JobRecord:
        return cls(**dict(spec), **facts)

    def spec(self) -> JobSpec:
        """The job's spec, as it was submitted."""
        return JobSpec(**{name: getattr(self, name) for name in JobSpec.model_fields})

    def resubmission(self) -> dict[str, Any]:
        """The arguments of :meth:`Platform.submit` (beside task, model, inputs, output and job id)
        that run this job again with the same spec."""
        return {"options": self.options, "text_column": self.text_column, "partition_rows": self.partition_rows,
                "token_budget": self.worker.token_budget or None, "fail_fast": self.fail_fast,
                "retries": self.retries, "timeout": self.timeout, "priority": self.priority, "gpu": self.gpu,
                "input_root": self.input_root,
                "reuse": self.reuse is not None, "tenant": self.reuse.tenant if self.reuse is not None else None}


def read_record(out_dir: str | os.PathLike[str], tasks: Mapping[str, TaskType] | None = None) -> JobRecord:
    """The job record in ``out_dir``, checked; :class:`InputError` naming the file and each bad
    field.  ``tasks``: the tasks registered beside the built-in ones."""
    path = os.path.join(os.fspath(out_dir), RECORD)
    try:
        raw = read_json(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} cannot be read as a job record: {exc}") from None
    if raw is None:
        raise InputError(f"{os.fspath(out_dir)} holds no job record ({RECORD}); nothing to resume")
    return checked(JobRecord, raw, path, tasks)


def checked(model: type[JobSpec], values: Mapping[str, Any], where: str,
            tasks: Mapping[str, TaskType] | None = None) -> Any:
    """``model`` from ``values``; an :class:`InputError` that names ``where`` and each bad field."""
    try:
        return model.model_validate(values, context={"tasks": tasks or {}})
    except ValidationError as exc:
        raise InputError(f"{where}: {_reasons(exc)}") from None


def _reasons(exc: ValidationError) -> str:
    """Each error of ``exc`` as ``field: why (got value)``, on one line."""
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        line = f"{field}: {str(error['msg']).removeprefix('Value error, ')}"
        got = _shown(error.get("input"))
        if got is not None and error["type"] not in ("missing", "value_error"):  # a value error names it itself
            line += f" (got {got})"
        lines.append(line)
    return "; ".join(dict.fromkeys(lines))


def _shown(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return None  # the fields inside say what is wrong
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return json.dumps(value)[:60]
    except (TypeError, ValueError):
        return f"{value!r:.60}"
