"""Bounds of task options, and of the texts they run on.

Every option value reaches the wire (the job record, the task's arguments,
a gateway's JSON) and then a model, so each is held to the range the model
and the engine accept, as a plain Python value: a whole number that does not
fit a signed 64-bit integer, a NaN or a list of a million stop strings is
refused here, with the option's name, before any work starts.  The
model-dependent limits (labels, vocabulary, positions) come from the model's
``config.json`` (:func:`model_limits`).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitinglip.errors import InputError
from bitinglip.platform.tasks.contract import INT64_MAX, MAX_CLASSES, MAX_STOP_CHARS, MAX_STOPS, Bound, JobFields, bound

__all__ = [
    "INT64_MAX",
    "MAX_CLASSES",
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "bounded_value",
    "choice",
    "is_whole",
    "job_priority",
    "job_text_column",
    "model_limits",
    "real",
    "strings",
    "surrogate_at",
    "whole",
]


def is_whole(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """Whether ``value`` is a whole number in ``[low, high]``: an ``int`` or a
    numpy integer, never a bool (``True`` is an ``int`` to Python, and JSON's
    ``true`` must not pass for 1).  The one definition; callers that word
    their own message test with this."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return (low is None or low <= int(value)) and (high is None or int(value) <= high)


def whole(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an ``int`` in ``[low, high]`` (numpy integers too; never a bool)."""
    if not is_whole(value):
        raise InputError(f"option {name}={_show(value)}: expected a whole number from {low} to {high}")
    if not is_whole(value, low, high):
        raise InputError(f"option {name}={_show(int(value))}: expected a whole number from {low} to {high}")
    return int(value)


def real(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    bounds = f"{'above' if low_open else 'from'} {low:g} {'up ' if low_open else ''}to {high:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"option {name}={_show(value)}: expected a number {bounds}")
    try:
        number = float(value)
    except OverflowError:  # an int past float's range
        number = math.inf
    if not math.isfinite(number) or number < low or number > high or (low_open and number == low):
        raise InputError(f"option {name}={_show(value)}: expected a finite number {bounds}")
    return number


def bounded_value(name: str, value: Any, b: Bound, kind: type) -> int | float:
    """``value`` checked against a contract field's range (:func:`~bitinglip.platform.tasks.contract.bound`):
    a whole number for an int field, a finite number for a float one."""
    if kind is int:
        return whole(name, value, int(b.low), int(b.high))  # type: ignore[arg-type]
    return real(name, value, float(b.low), float(b.high), low_open=b.low_open)  # type: ignore[arg-type]


def job_priority(value: Any) -> int:
    """A job's ``priority``, within the contract's range (REST and the Python client)."""
    b = bound(JobFields, "priority")
    if not is_whole(value, int(b.low), int(b.high)):  # type: ignore[arg-type]
        raise InputError(f"priority={_show(value)}: expected a whole number from {b.low} to {b.high}")
    return int(value)


def job_text_column(value: Any) -> str:
    """A job's ``text_column``: a column name within the contract's length (REST, the Python client and the CLI)."""
    b = bound(JobFields, "text_column")
    if not isinstance(value, str) or not b.low <= len(value) <= b.high or surrogate_at(value) is not None:  # type: ignore[operator]
        raise InputError(f"text_column={_show(value)}: expected a column name of {b.low} to {b.high} characters")
    return value


def choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared by type too: 1 is not True)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise InputError(f"option {name}={_show(value)}: expected one of "
                         f"{', '.join('null' if c is None else str(c) for c in choices)}")
    return value


def strings(name: str, value: Any, most: int, chars: int) -> tuple[str, ...]:
    """A string or a list of up to ``most`` non-empty strings of at most ``chars`` characters."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or len(items) > most or not all(
            isinstance(s, str) and 0 < len(s) <= chars and surrogate_at(s) is None for s in items):
        raise InputError(f"option {name} must be a string or a list of at most {most} non-empty "
                         f"strings of at most {chars} characters; got {_show(value)}")
    return tuple(items)


def surrogate_at(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate (e.g. from JSON's "\\ud800"), if it
    does: such a text cannot be encoded as UTF-8, so no tokenizer or Parquet
    file takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _show(value: Any) -> str:
    try:
        return f"{value!r:.60}"
    except ValueError:  # an int of over 4300 digits has no str
        return f"<a {type(value).__name__} too long to show>"


@dataclass(frozen=True)
class ModelLimits:
    """What a model's ``config.json`` says about the options it can take (None: not said)."""

    labels: int | None = None
    vocabulary: int | None = None
    positions: int | None = None
    #: the width of the embed task's vector: it pools the last hidden states (``hidden_size``)
    hidden: int | None = None


def model_limits(model_dir: str | None) -> ModelLimits:
    """The limits in ``model_dir/config.json``; none when the file is not here
    (a model only the workers can see keeps the fixed bounds)."""
    if model_dir is None:
        return ModelLimits()
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return ModelLimits()
    if not isinstance(config, Mapping):
        return ModelLimits()
    id2label = config.get("id2label")
    labels = len(id2label) if isinstance(id2label, Mapping) and id2label else _count(config.get("num_labels"))
    positions = [_count(config.get(k)) for k in ("max_position_embeddings", "n_positions")]
    known = [p for p in positions if p is not None]
    return ModelLimits(labels, _count(config.get("vocab_size")), min(known) if known else None,
                       _count(config.get("hidden_size")))


def _count(value: Any) -> int | None:
    return int(value) if is_whole(value, 1, 10**9) else None
