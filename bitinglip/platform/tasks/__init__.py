"""Tasks: the task types and their pure compute (batching, encoders, precision, heads, options); no Dask, no Redis.

The names below are the package's public API; code outside the platform imports them from here.
Modules inside the platform import each other by module path (``bitinglip.platform.tasks.builtin``),
so that this file never takes part in an import cycle.  ``encoders`` (torch) is not imported here:
a task loads it when it loads its model.
"""

from bitinglip.platform.tasks.builtin import (
    BUILTIN_TASKS,
    DTYPES,
    POOLINGS,
    Batch,
    Loaded,
    TaskType,
    check_task_type,
    get_task,
    texts_or_error,
)
from bitinglip.platform.tasks.generation import MAX_TEMPERATURE, schema_key
from bitinglip.platform.tasks.options import choice, is_whole, model_limits, real, surrogate_at, whole

__all__ = ["BUILTIN_TASKS", "DTYPES", "MAX_TEMPERATURE", "POOLINGS", "Batch", "Loaded", "TaskType", "check_task_type",
           "choice", "get_task", "is_whole", "model_limits", "real", "schema_key", "surrogate_at", "texts_or_error",
           "whole"]
