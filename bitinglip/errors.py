"""Domain errors. Every error BitingLip raises on purpose derives from
:class:`BitingLipError` and carries a stable ``code`` that the gateway maps to
an HTTP status in one table."""

from __future__ import annotations


class BitingLipError(Exception):
    code = "error"


class ConfigError(BitingLipError):
    """A setting or environment variable has an invalid value."""

    code = "invalid_config"


class InputError(BitingLipError, ValueError):
    """The input (a row, a file, an argument) is not acceptable; says where."""

    code = "invalid_input"


class UnknownTaskError(BitingLipError, LookupError):
    code = "unknown_task"


class UnknownModelError(BitingLipError, LookupError):
    code = "unknown_model"


class ModelLoadError(BitingLipError):
    code = "model_load_failed"


class NoGPUWorkersError(BitingLipError):
    """A job asked for GPUs and no worker in the cluster has the GPU resource."""

    code = "no_gpu_workers"


class PluginMissingError(BitingLipError):
    code = "plugin_missing"


class JobFailedError(BitingLipError):
    code = "job_failed"


class RowCountError(JobFailedError):
    """Rows out plus rows in error differ from rows in: rows were lost or
    made up on the way, so the job must not report success."""

    code = "row_count_mismatch"


class JobCancelledError(BitingLipError):
    code = "job_cancelled"


class UnauthorizedError(BitingLipError):
    """No token, or a token that is malformed, expired or wrongly signed."""

    code = "unauthorized"


class ForbiddenError(BitingLipError):
    """A valid token without the scope, or an address not on the allowlist."""

    code = "forbidden"


class NotFoundError(BitingLipError, LookupError):
    """No such job or model (or one that belongs to someone else)."""

    code = "not_found"


class ConflictError(BitingLipError):
    """The request does not fit the resource's state (e.g. cancel a finished job)."""

    code = "conflict"


class PayloadTooLargeError(BitingLipError):
    code = "payload_too_large"


class QuotaExceededError(PayloadTooLargeError):
    """An upload would take the caller past its storage quota."""

    code = "quota_exceeded"


class RateLimitedError(BitingLipError):
    """Too many requests; ``retry_after`` seconds until the next is allowed."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers or {}


class UnavailableError(BitingLipError):
    """A dependency (Redis, the scheduler) cannot be reached, or the work is
    not ready yet; ``retry_after`` seconds, when given, go out as ``Retry-After``."""

    code = "unavailable"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)} if retry_after else {}


class InvalidModelNameError(InputError):
    """A model name or version has characters outside the allowed set."""

    code = "invalid_model_name"


class IntegrityError(BitingLipError):
    """A model's files do not match the sha256 manifest written when it was added."""

    code = "integrity_failed"


class UnsafeWeightsError(BitingLipError):
    """Pickle-based weights (.bin, .pt, .pkl, ...) while the admin setting forbids them."""

    code = "unsafe_weights"


class ModelSourceError(BitingLipError):
    """A model source (folder, package, hub repo) cannot be read."""

    code = "model_source_failed"


class ModelError(ModelSourceError):
    """A model's files or weights are unusable as given; trying again cannot help,
    so a partition that meets one fails at once instead of retrying."""

    code = "invalid_model"


class UnsafeModelFileError(ModelError):
    """A model folder holds a link or a special file (FIFO, socket, device)."""

    code = "unsafe_model_file"


class ModelTooLargeError(ModelError):
    """A model's files add up to more than ``BITINGLIP_MODEL_MAX_BYTES``."""

    code = "model_too_large"


class UntrainedHeadError(ModelError):
    """The task's head (e.g. a classifier) is not in the weights: it would start random."""

    code = "untrained_head"


class ModelInUseError(BitingLipError):
    """A model version cannot be removed while a running job uses it."""

    code = "model_in_use"


class JobTimeoutError(BitingLipError):
    """The job ran past its ``timeout``."""

    code = "job_timeout"


class PartitionFailedError(BitingLipError):
    """A partition failed on every allowed attempt; the message keeps each reason."""

    code = "partition_failed"


class OutputConflictError(BitingLipError):
    """The output directory holds results of a different job."""

    code = "output_conflict"


class OutputWriteError(BitingLipError):
    """A result file or a job's record could not be written (disk full, no
    permission...); the message names the path and the operating system's reason."""

    code = "output_write_failed"


class StackError(BitingLipError):
    """A service of the local stack (``bitinglip up``) did not start or stay up."""

    code = "stack_failed"


class RequestTimeoutError(BitingLipError):
    """The client took too long to send its request."""

    code = "request_timeout"


class UnsupportedOptionError(InputError):
    """The engine that runs the model cannot honour an option as asked (structured
    output on the transformers engine, a penalty it does not implement): the row
    is refused rather than generated without it."""

    code = "unsupported_option"


class EngineError(BitingLipError):
    """A generation engine failed a request, or was shut down while the request ran."""

    code = "engine_failed"


class ModelBrokenError(ModelLoadError):
    """A model's engine broke on this worker again after a restart: the worker
    refuses the model from then on, naming why, and its work goes elsewhere."""

    code = "model_broken"
