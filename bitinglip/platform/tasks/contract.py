"""The task options, row parameters, chat messages and job fields, declared once.

Each field's name, type, default, bound and description is written here, as a
pydantic field, and nowhere else.  Everything else reads it: the checks of
:mod:`~bitinglip.platform.tasks.options` and
:mod:`~bitinglip.platform.tasks.generation` (their bounds, through
:func:`bound`), the tasks' ``defaults``, the gateway's request bodies and
OpenAPI document (:func:`json_schema`), the batch file's Parquet types
(:func:`python_type`), ``bitinglip run --help`` and the README's option
tables (:func:`option_rows`).  So a bound changes in one line here and every
surface follows (``tests/gateway/test_contract_bounds.py`` holds them to it).

The values are still checked by the hand-worded checks (their messages name
the row, the parameter and the bound, as users and tests read them); what
they check against comes from here.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

#: torch.manual_seed and numpy take at most a signed 64-bit integer
INT64_MAX = 2**63 - 1
#: the most labels or vocabulary entries a model may claim (the largest vocabularies hold about 260k)
MAX_CLASSES = 1_000_000
#: stop strings per job, and characters per stop string
MAX_STOPS, MAX_STOP_CHARS = 16, 200
#: characters per chat message, bytes of a JSON schema in response_format
MAX_MESSAGE_CHARS, MAX_SCHEMA_BYTES = 1_000_000, 64 * 1024

DTYPES = ("float32", "float16", "bfloat16", "int8")
#: how embed pools token states into one vector (None, as an option: the model's own config)
POOLINGS = ("mean", "cls", "max", "lasttoken")
#: float32 matrix-product precisions, named as ``torch.set_float32_matmul_precision`` names them
MATMUL_PRECISIONS = ("highest", "medium")
#: what a job may ask for: a precision, or ``auto`` (each worker times both on its CPU)
MATMUL_CHOICES = ("auto", *MATMUL_PRECISIONS)
ENGINES = ("auto", "vllm", "transformers")
ROLES = ("system", "user", "assistant", "tool", "developer")
_Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Contract):
    """The sampling parameters a generate job sets for all rows and a row's
    ``params`` may override, named as OpenAI names them."""

    max_tokens: int = Field(32, ge=1, le=4096,
                            description="new tokens per completion (the model's positions bound it further)")
    #: vLLM's SamplingParams refuses a temperature above 2 (OpenAI's range too): refused before dispatch
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 picks the likeliest token (greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: the smallest set of tokens this likely")
    top_k: int = Field(0, ge=0, le=MAX_CLASSES,
                       description="sample from the k likeliest tokens; 0: no cut (the model's vocabulary bounds it)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens below this share of the likeliest one's")
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, description="above 1 discourages repeated tokens")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: penalizes tokens already present")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: penalizes tokens by their count")
    stop: _Stop | Annotated[tuple[_Stop, ...], Field(max_length=MAX_STOPS)] = Field(
        (), description=f"a string, or up to {MAX_STOPS} strings, of 1 to {MAX_STOP_CHARS} characters that end a "
                        "completion")
    seed: int | None = Field(None, ge=0, le=INT64_MAX, description="makes sampling repeatable")
    n: int = Field(1, ge=1, le=16, description="completions per row")
    #: OpenAI's limit is 20
    logprobs: int | None = Field(None, ge=0, le=20,
                                 description="top log-probabilities kept per token (adds a logprobs column)")
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}')
    ignore_eos: bool = Field(False, description="generate max_tokens tokens whatever the model says")


class Params(Sampling):
    """A generation row's ``params``: the sampling parameters, each optional
    (a row's own value over the job's)."""


class ChatMessage(_Contract):
    """One message of a chat row (``messages``)."""

    role: Literal[ROLES] = Field(description="who says it")  # type: ignore[valid-type]
    content: str = Field(max_length=MAX_MESSAGE_CHARS, description="the text")


#: messages per chat
MAX_MESSAGES = 1024


class _Load(_Contract):
    dtype: Literal[DTYPES] = Field(  # type: ignore[valid-type]
        "float32", description="the weights' type on the worker")


class EmbedOptions(_Load):
    """The embed task's options."""

    normalize: bool | None = Field(None, description="scale vectors to length 1 (null: the model's config says)")
    pooling: Literal[POOLINGS] | None = Field(  # type: ignore[valid-type]
        None, description="how token states become one vector (null: the model's config says)")
    matmul_precision: Literal[MATMUL_CHOICES] = Field(  # type: ignore[valid-type]
        "auto", description="float32 products (highest), bfloat16 (medium), or the faster one that agrees (auto)")
    count_tokens: bool = Field(False, description="also write each row's token count (column tokens: an OpenAI "
                                                  "batch line's usage.prompt_tokens)")


class ClassifyOptions(_Load):
    """The classify task's options."""

    top_k: int = Field(1, ge=1, le=MAX_CLASSES, description="labels kept per row, likeliest first "
                                                             "(the model's labels bound it)")


class GenerateOptions(_Load, Sampling):
    """The generate task's options: the engine and the sampling parameters every row starts from."""

    engine: Literal[ENGINES] = Field(  # type: ignore[valid-type]
        "auto", description="vllm, transformers, or vLLM where it serves the model (auto)")
    prefix_order: bool = Field(True, description="rows reach the engine sorted by prompt tokens, across every "
                                                 "partition on a worker, so rows sharing a prefix share its cached "
                                                 "KV blocks")


#: each built-in task's options
TASK_OPTIONS: dict[str, type[_Contract]] = {"embed": EmbedOptions, "classify": ClassifyOptions,
                                            "generate": GenerateOptions}


#: a bulk job's Dask priority when it names none (an OpenAI batch, a resumed job of an older record)
DEFAULT_PRIORITY = 5


class JobFields(_Contract):
    """A job's own fields beside its task and model (REST body, Python client, CLI)."""

    text_column: str = Field("text", min_length=1, max_length=200, description="the input's column of texts")
    priority: int = Field(DEFAULT_PRIORITY, ge=1, le=10, description="Dask priority among bulk jobs; higher runs first")


# --- reading the declarations


@dataclass(frozen=True)
class Bound:
    """A field's numeric range: ``[low, high]``, or ``(low, high]`` when ``low_open``."""

    low: float | None
    high: float | None
    low_open: bool = False


def bound(model: type[BaseModel], name: str) -> Bound:
    """The range ``model.name`` is declared with (numbers: its value; strings and lists: its length)."""
    low = high = None
    low_open = False
    for item in model.model_fields[name].metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Gt):
            low, low_open = item.gt, True
        elif isinstance(item, annotated_types.Le):
            high = item.le
        elif isinstance(item, annotated_types.MinLen):
            low = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            high = item.max_length
    return Bound(low, high, low_open)


def defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Each field's default, by name."""
    return {name: f.default for name, f in model.model_fields.items()}


def python_type(model: type[BaseModel], name: str) -> type:
    """The plain type of ``model.name`` without None (``int | None`` -> int, ``tuple[str, ...]`` -> list)."""
    annotation = _bare(model.model_fields[name].annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [_bare(a) for a in typing.get_args(annotation) if a is not type(None)]
        # a string or a list of them (stop) is kept as a list
        annotation = next((a for a in members if typing.get_origin(a) is tuple), members[0])
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return list
    if origin is Literal:
        return type(typing.get_args(annotation)[0])
    return origin or annotation


def _bare(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation


def bounded(model: type[BaseModel]) -> Iterator[tuple[str, Bound]]:
    """The fields of ``model`` with an upper numeric bound."""
    for name in model.model_fields:
        b = bound(model, name)
        if b.high is not None and python_type(model, name) in (int, float):
            yield name, b


def json_schema(model: type[BaseModel], names: typing.Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """The JSON Schema of ``model``'s fields (``names``: some of them), as
    the OpenAPI document shows them: no titles, None as ``null``, a tuple as
    an array, an int bound as an int."""
    properties = model.model_json_schema()["properties"]
    wanted = list(model.model_fields) if names is None else list(names)
    return {name: _tidy(copy.deepcopy(properties[name])) for name in wanted}


def _tidy(schema: Any) -> Any:
    if isinstance(schema, dict):
        schema.pop("title", None)
        for key in ("minimum", "maximum", "exclusiveMinimum"):
            if isinstance(schema.get(key), float) and schema[key].is_integer():
                schema[key] = int(schema[key])
        if isinstance(schema.get("default"), tuple):
            schema["default"] = list(schema["default"])
        return {k: _tidy(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_tidy(v) for v in schema]
    return schema


def describe(model: type[BaseModel], name: str) -> tuple[str, str, str, str]:
    """``(type, range, default, description)`` of one field, as the CLI's help and the README's tables show it."""
    field = model.model_fields[name]
    kind = python_type(model, name)
    annotation = field.annotation
    choices = [a for a in typing.get_args(annotation) if typing.get_origin(a) is Literal]
    if typing.get_origin(annotation) is Literal:
        choices = [annotation]
    words = [str(w) for c in choices for w in typing.get_args(c)]
    nullable = type(None) in typing.get_args(annotation)
    b = bound(model, name)
    if words:
        shown_range = " | ".join(words + (["null"] if nullable else []))
        kind = str
    elif kind in (int, float) and (b.low is not None or b.high is not None):
        shown_range = f"{'(' if b.low_open else '['}{_num(b.low)}, {_num(b.high)}]"
    elif kind is list:
        most = b.high if b.high is not None else _items(annotation)
        shown_range = f"up to {most} items" if most is not None else ""
    else:
        shown_range = ""
    default = field.default
    shown_default = ("null" if default is None else str(default).lower() if isinstance(default, bool)
                     else "[]" if default == () else str(default))
    type_name = {int: "integer", float: "number", bool: "boolean", str: "string", list: "list",
                 dict: "object"}.get(kind, kind.__name__)
    if kind is list and str in [_bare(a) for a in typing.get_args(annotation)]:
        type_name = "string or list"
    return type_name, shown_range, shown_default, field.description or ""


def _items(annotation: Any) -> int | None:
    """The most items a list member of a union may hold (``Annotated[tuple[...], Field(max_length=N)]``)."""
    for member in typing.get_args(annotation):
        for meta in typing.get_args(member)[1:] if typing.get_origin(member) is Annotated else ():
            for item in getattr(meta, "metadata", ()):
                if isinstance(item, annotated_types.MaxLen):
                    return int(item.max_length)
    return None


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) and abs(value) < 1e15 else str(value)


def option_rows(task: str) -> list[tuple[str, str, str, str, str]]:
    """``(name, type, range, default, description)`` of each option of a built-in task, by name."""
    model = TASK_OPTIONS[task]
    return [(name, *describe(model, name)) for name in sorted(model.model_fields)]
