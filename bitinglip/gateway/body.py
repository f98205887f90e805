"""Reading request bodies and query parameters, and checking the fields that
several routes share (texts, task and options), with errors that say what is wrong."""

from __future__ import annotations

import json
from typing import Any

import anyio
from starlette.requests import Request

from bitinglip.errors import BitingLipError, InputError
from bitinglip.platform.models import resolve_model
from bitinglip.platform.tasks import BUILTIN_TASKS, surrogate_at, texts_or_error

#: the deepest nesting a body may have; real ones go 3 deep ({"options": {"stop": [...]}})
MAX_DEPTH = 32


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body, or an :class:`InputError`."""
    if "json" not in request.headers.get("content-type", ""):
        raise InputError("send the body as JSON with Content-Type: application/json")
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # the parser recurses per level: thousands of "[" exhaust the stack
        raise InputError(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object")
    if depth(body) > MAX_DEPTH:  # every later walk (checks, json.dumps, Redis) would recurse as deep
        raise InputError(f"the body nests deeper than {MAX_DEPTH} levels")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # Python's json takes NaN and Infinity; JSON does not


def depth(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (counted up to just past
    :data:`MAX_DEPTH`), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def lone_surrogate(value: Any, where: str) -> str | None:
    """The field of ``value`` that holds a string that is not valid Unicode
    (JSON's ``"\\ud800"`` parses to a lone surrogate, which UTF-8, Redis and
    Parquet refuse), named from ``where`` (``body.user[0]``, ``a key of
    body``); None when there is none."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if surrogate_at(item) is not None:
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if surrogate_at(key) is not None:
                    return f"a key of {path}"
                stack.append((child, f"{path}.{key:.40}"))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"query parameter {name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise InputError(f"query parameter {name}={value} must be between {low} and {high}")
    return value


def check_texts(texts: list[str], limit: int, max_chars: int, what: str) -> list[str]:
    """``texts`` (a body's model took them as a non-empty list of strings) within this gateway's limits."""
    if len(texts) > limit:
        raise InputError(f"{what} has {len(texts)} rows; the limit is {limit}")
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise InputError(f"{what}[{i}] has {len(text)} characters; the limit is {max_chars}")
        texts_or_error([text], [f"{what}[{i}]"])  # e.g. a lone surrogate
    return texts


def check_task(task: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The options of ``task`` (a built-in task: the body's model said so), checked by the task itself, in the
    words the Python client and the CLI use too."""
    options = options or {}
    BUILTIN_TASKS[task].check_options(options)
    return options


async def check_model_options(gw: Any, task: str, model: str, options: dict[str, Any]) -> None:
    """Refuse options past what ``model`` takes (its labels, vocabulary,
    positions) with an :class:`InputError`; a model this gateway cannot see
    keeps the fixed bounds, and the cluster checks it again at submission."""
    try:
        path = await anyio.to_thread.run_sync(resolve_model, model, gw.settings)
    except (BitingLipError, OSError):
        return
    checked = BUILTIN_TASKS[task].check_options(options)
    BUILTIN_TASKS[task].check_model_options(checked, path.path)
