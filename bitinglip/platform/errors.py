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


class JobCancelledError(BitingLipError):
    code = "job_cancelled"
