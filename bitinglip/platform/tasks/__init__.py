"""Tasks: the task types and their pure compute (batching, encoders, precision, heads, options), and the contract of their options; no Dask, no Redis.

The names below are the package's public API; code outside the platform imports them from here.
Modules inside the platform import each other by module path (``bitinglip.platform.tasks.builtin``),
so that this file never takes part in an import cycle.  ``encoders`` (torch) is not imported here:
a task loads it when it loads its model.
"""

from bitinglip.platform.tasks.builtin import (
    BUILTIN_TASKS,
    Batch,
    Loaded,
    TaskType,
    check_task_type,
    get_task,
    texts_or_error,
)
from bitinglip.platform.tasks.contract import (
    DEFAULT_PRIORITY,
    DTYPES,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    POOLINGS,
    ROLES,
    TASK_OPTIONS,
    Bound,
    ChatMessage,
    ClassifyOptions,
    EmbedOptions,
    GenerateOptions,
    JobFields,
    Params,
    Sampling,
    bound,
    bounded,
    json_schema,
    option_rows,
    python_type,
)
from bitinglip.platform.tasks.generation import schema_key
from bitinglip.platform.tasks.options import (
    bounded_value,
    choice,
    is_whole,
    job_priority,
    job_text_column,
    model_limits,
    real,
    surrogate_at,
    whole,
)

__all__ = ["BUILTIN_TASKS", "DEFAULT_PRIORITY", "DTYPES", "MAX_MESSAGES", "MAX_STOP_CHARS", "POOLINGS", "ROLES", "TASK_OPTIONS", "Batch",
           "Bound", "ChatMessage", "ClassifyOptions", "EmbedOptions", "GenerateOptions", "JobFields", "Loaded",
           "Params", "Sampling", "TaskType", "bound", "bounded", "bounded_value", "check_task_type", "choice",
           "get_task", "is_whole", "job_priority", "job_text_column", "json_schema", "model_limits", "option_rows", "python_type", "real",
           "schema_key", "surrogate_at", "texts_or_error", "whole"]
