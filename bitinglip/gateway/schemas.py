"""The request bodies the gateway takes, as pydantic models, and the one
function that turns a refused body into an :class:`InputError`.

A body's fields take their type, bound, default and description from the
platform's contract (:mod:`bitinglip.platform.tasks`): a bound is written
there once.  The routes validate each body with its model (:func:`parse`)
and use the typed result; :mod:`bitinglip.gateway.openapi` publishes each
model's own JSON schema (:func:`schema`), so the document cannot name a field
the route refuses, or miss one it takes.  The OpenAI bodies are in
:mod:`bitinglip.gateway.openai.bodies`.

What a model cannot say stays a check of its own: a task's options (the
task checks them, with the words the Python client and the CLI use too),
lone surrogates, the body's depth, the model lookup, the limits that are
settings.  A check that must keep its own words runs inside a model as a
validator that raises :func:`refuse`; :func:`parse` passes its error on.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from bitinglip.errors import InputError
from bitinglip.platform.tasks import BUILTIN_TASKS, DTYPES, POOLINGS, TASK_OPTIONS, JobFields, json_schema

Body = TypeVar("Body", bound=BaseModel)

#: a REST job's idempotency key; the colon is allowed, the key is stored length-prefixed
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


def refuse(message: str, param: str | None = None) -> InputError:
    """An :class:`InputError` naming the field it is about (OpenAI's ``param``)."""
    exc = InputError(message)
    exc.param = param  # type: ignore[attr-defined]  # read by the gateway's error handler
    return exc


class Strict(BaseModel):
    """A body or a part of one: unknown fields are refused (OpenAI refuses them too, rather than ignore a typo),
    and a value is taken only as JSON wrote it ("5" is not 5, 1 is not true)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def optional(model: type[BaseModel], name: str) -> Any:
    """The type of the contract's ``model.name``, bounds included, or null (an OpenAI body leaves it unset)."""
    field = model.model_fields[name]
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    if "tuple" in repr(field.annotation):  # the contract keeps a list as a tuple (frozen); JSON sends a list
        kind = Annotated[kind, BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]
    return Annotated[kind | None, Field(None, description=field.description)]


def required(model: type[BaseModel], name: str) -> Any:
    """The type of the contract's ``model.name``, bounds included, required."""
    field = model.model_fields[name]
    return Annotated[(field.annotation, *field.metadata, Field(description=field.description))]


Name = Annotated[str, StringConstraints(min_length=1)]
Texts = Annotated[list[str], Field(min_length=1)]
Task = Literal[tuple(sorted(BUILTIN_TASKS))]  # type: ignore[valid-type]
#: one of the tasks' option sets (the contract's), e.g. {"normalize": true} for embed; the task checks them
Options = Annotated[dict[str, Any] | None, WithJsonSchema({
    "type": "object", "description": "the task's options, e.g. {\"normalize\": true} for embed",
    "anyOf": [{"title": task, "type": "object", "additionalProperties": False, "properties": json_schema(model)}
              for task, model in TASK_OPTIONS.items()]})]


class JobRequest(Strict):
    """``POST /v1/jobs``."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["inputs"]}, {"required": ["input_uri"]}]})

    task: Task
    model: Name
    inputs: Texts | None = None
    input_uri: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = Field(
        None, description="a file:// URI or path inside the gateway's input directory")
    text_column: str = JobFields.model_fields["text_column"]
    options: Options = None
    priority: int = JobFields.model_fields["priority"]
    idempotency_key: Annotated[str, StringConstraints(pattern=IDEMPOTENCY_KEY_PATTERN)] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> JobRequest:
        if (self.inputs is None) == (self.input_uri is None):
            raise refuse("give exactly one of inputs (a list of strings) and input_uri")
        return self


class InferRequest(Strict):
    """``POST /v1/infer``."""

    task: Task
    model: Name
    inputs: Texts
    options: Options = None


class ModelRegistration(Strict):
    """``POST /admin/models``."""

    name: Name
    source: Name = Field(description="a directory or a .gguf file the gateway can read, hf://org/name@commit or "
                                     "pkg://distribution")
    task: Name = Field(description="a task name such as embed, classify or generate")
    dtype: Literal[DTYPES] = "float32"  # type: ignore[valid-type]
    max_length: Annotated[int, Field(ge=1)] | None = None
    pooling: Literal[POOLINGS] | None = None  # type: ignore[valid-type]


# --- a refused body, in words


#: what a value of each type is called, by pydantic's error type
_KINDS = {"string_type": "a string", "int_type": "a whole number", "float_type": "a number",
          "bool_type": "true or false", "list_type": "a list", "tuple_type": "a list", "dict_type": "an object",
          "model_type": "an object", "model_attributes_type": "an object", "none_required": "null"}
_BOUNDS = {"less_than_equal": ("le", "at most"), "less_than": ("lt", "below"),
           "greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "above")}
_LENGTHS = {"too_long": ("max_length", "at most", "items"), "too_short": ("min_length", "at least", "items"),
            "string_too_long": ("max_length", "at most", "characters"),
            "string_too_short": ("min_length", "at least", "characters")}


def parse(model: type[Body], body: Any) -> Body:
    """``body`` as ``model``, or an :class:`InputError` that names the field
    (``messages[2].role``, ``output_expires_after.seconds``) and what is wrong with it;
    its ``param`` is the field up to its first index (OpenAI's ``param``)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _refusal(model, body, exc.errors(include_url=False)) from None


def _refusal(model: type[BaseModel], body: Any, errors: list[Any]) -> InputError:
    for error in errors:  # a check of our own inside the model keeps its words and its field
        if isinstance((error.get("ctx") or {}).get("error"), InputError):
            return error["ctx"]["error"]
    placed = [(*_path(error["loc"], body, error["type"]), error) for error in errors]
    unknown = [path for path, _, _, error in placed if error["type"] == "extra_forbidden" and "." not in path
               and "[" not in path]
    if unknown:
        return refuse(f"unknown field {', '.join(unknown)}; fields are {', '.join(sorted(model.model_fields))}",
                      unknown[0])
    # a wrong value before a wrong type, and the deepest first: of a union (a string or a list) the branch
    # that took the value's type says more than the one that did not
    placed.sort(key=lambda p: (p[3]["type"] in _KINDS, -p[2]))
    path, param, _, error = placed[0]
    kind = error["type"]
    if kind in _KINDS:
        kinds = dict.fromkeys(_KINDS[e["type"]] for p, _, _, e in placed if p == path and e["type"] in _KINDS)
        return refuse(f"{path} must be {' or '.join(kinds)}, got {_json_type(error['input'])}", param)
    return refuse(f"{path}{_problem(error)}", param)


def _path(loc: tuple[Any, ...], body: Any, kind: str) -> tuple[str, str, int]:
    """``loc`` as the body writes it (``messages[2].role``), without pydantic's
    union tags (``str``, ``list[str]``); its param; its depth."""
    path, param, depth, here = "", None, 0, body
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(here, list):
            param = param if param is not None else path
            path += f"[{part}]"
            here = here[part] if part < len(here) else None
        elif isinstance(part, str) and isinstance(here, dict) and (part in here or i == len(loc) - 1 and
                                                                   kind == "missing"):
            path += f".{part}" if path else part
            here = here.get(part)
        else:  # a union's tag, or a dict key's marker
            continue
        depth += 1
    return path or "the body", (param if param is not None else path) or None, depth


def _problem(error: dict[str, Any]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return " is required"
    if kind == "extra_forbidden":
        return ": unknown field"
    if kind == "literal_error":
        return f" must be one of {ctx['expected']}" if "," in ctx["expected"] or " or " in ctx["expected"] \
            else f" must be {ctx['expected']}"
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return f"={_show(value)}: expected {words} {_number(ctx[key])}"
    if kind in _LENGTHS:
        key, words, unit = _LENGTHS[kind]
        if unit == "characters":
            return f"={_show(value)}: expected {words} {ctx[key]} characters, got {len(value)}"
        return f" has {len(value)} {unit}; expected {words} {ctx[key]}"
    if kind == "string_unicode":  # JSON's "\ud800": no UTF-8 file, Redis key or tokenizer takes it
        return " is not valid Unicode (a lone surrogate)"
    if kind == "string_pattern_mismatch":
        return f"={_show(value)}: expected a string matching {ctx['pattern']}"
    return f"={_show(value)}: {error['msg']}"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) and abs(value) < 1e15 else str(value)


def _show(value: Any) -> str:
    try:
        return f"{value!r:.60}"
    except ValueError:  # an int of over 4300 digits has no str
        return f"<a {type(value).__name__} too long to show>"


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


# --- the document's view


def schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema as the OpenAPI document shows a request body:
    whole (its parts inlined, not under ``$defs``), without pydantic's titles."""
    found = model.model_json_schema()
    parts = found.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(copy.deepcopy(parts[node["$ref"].rsplit("/", 1)[1]]))
            return {k: inline(v) for k, v in node.items() if not (k == "title" and isinstance(v, str)
                                                                   and "properties" not in node)}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(found)
