"""The request bodies the gateway takes, declared once.

Each :class:`BodyModel` names a body's fields, their JSON Schema and which
are required; the fields the platform declares (a job's ``text_column`` and
``priority``, the sampling parameters, a chat message) take their schema from
its contract (:mod:`bitinglip.platform.tasks`), bounds and defaults included.  The routes check every body against it (:meth:`BodyModel.check`:
unknown and missing fields) before their own checks of each value, and
:mod:`bitinglip.gateway.openapi` publishes :meth:`BodyModel.schema`, so the
document cannot name a field the route refuses, or miss one it takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bitinglip.errors import InputError
from bitinglip.platform.tasks import (
    BUILTIN_TASKS,
    DTYPES,
    MAX_MESSAGES,
    POOLINGS,
    TASK_OPTIONS,
    ChatMessage,
    JobFields,
    Params,
    json_schema,
)

#: a REST job's idempotency key; the colon is allowed, the key is stored length-prefixed
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
TASK = {"type": "string", "enum": sorted(BUILTIN_TASKS)}
TEXTS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
#: one of the tasks' option sets (the contract's), e.g. {"normalize": true} for embed
OPTIONS = {"type": "object", "description": "the task's options, e.g. {\"normalize\": true} for embed",
           "anyOf": [{"title": task, "type": "object", "additionalProperties": False, "properties": json_schema(model)}
                     for task, model in TASK_OPTIONS.items()]}


@dataclass(frozen=True)
class BodyModel:
    """One JSON object body: its fields' schemas, the required ones, and how
    a refusal words the list of fields."""

    name: str
    fields: Mapping[str, dict[str, Any]]
    required: tuple[str, ...]
    #: extra JSON Schema keywords for the whole body (e.g. "exactly one of")
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: "unknown field x; {fields_word} a, b, c"
    fields_word: str = "fields are"
    #: message for a required field that is absent or not a non-empty string; None leaves it to the route
    required_message: str | None = None

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "required": list(self.required), "additionalProperties": False,
                "properties": dict(self.fields), **self.extra}

    def check(self, body: Mapping[str, Any]) -> None:
        """Refuse fields the model does not name (and, where the model says
        so, a required field that is not a non-empty string)."""
        unknown = sorted(set(body) - set(self.fields))
        if unknown:
            raise InputError(f"unknown field {', '.join(unknown)}; {self.fields_word} {', '.join(sorted(self.fields))}")
        if self.required_message is not None:
            for name in self.required:
                if not isinstance(body.get(name), str) or not body[name]:
                    raise InputError(self.required_message.format(name=name))


JOB_REQUEST = BodyModel("JobRequest", {
    "task": TASK,
    "model": {"type": "string", "minLength": 1},
    "inputs": TEXTS,
    "input_uri": {"type": "string", "minLength": 1, "maxLength": 2000,
                  "description": "a file:// URI or path inside the gateway's input directory"},
    **json_schema(JobFields, ["text_column"]),
    "options": OPTIONS,
    **json_schema(JobFields, ["priority"]),
    "idempotency_key": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
}, required=("task", "model"), extra={"oneOf": [{"required": ["inputs"]}, {"required": ["input_uri"]}]})

INFER_REQUEST = BodyModel("InferRequest", {
    "task": TASK, "model": {"type": "string", "minLength": 1}, "inputs": TEXTS, "options": OPTIONS,
}, required=("task", "model", "inputs"))

MODEL_REGISTRATION = BodyModel("ModelRegistration", {
    "name": {"type": "string", "minLength": 1},
    "source": {"type": "string", "minLength": 1,
               "description": ("a directory or a .gguf file the gateway can read, hf://org/name@commit or "
                               "pkg://distribution")},
    "task": {"type": "string", "minLength": 1, "description": "a task name such as embed, classify or generate"},
    "dtype": {"type": "string", "enum": list(DTYPES), "default": "float32"},
    "max_length": {"type": "integer", "minimum": 1},
    "pooling": {"type": "string", "enum": list(POOLINGS)},
}, required=("name", "source", "task"), fields_word="expected", required_message="field {name!r} is required (a string)")

#: the endpoints a batch may run (OpenAI's names); the chat and text completions and responses need generation
#: rows (issue 16)
BATCH_ENDPOINTS = ("/v1/embeddings", "/v1/chat/completions", "/v1/completions", "/v1/responses")

BATCH_REQUEST = BodyModel("BatchRequest", {
    "input_file_id": {"type": "string", "minLength": 1, "description": "a file uploaded with purpose=batch"},
    "endpoint": {"type": "string", "enum": list(BATCH_ENDPOINTS)},
    "completion_window": {"type": "string", "enum": ["24h"]},
    "output_expires_after": {
        "type": "object", "required": ["anchor", "seconds"], "additionalProperties": False,
        "properties": {"anchor": {"type": "string", "enum": ["created_at"]},
                       "seconds": {"type": "integer", "minimum": 3600, "maximum": 2592000}},
        "description": "the output and error files expire this long after they are written"},
    "metadata": {"type": ["object", "null"], "maxProperties": 16, "propertyNames": {"maxLength": 64},
                 "additionalProperties": {"type": "string", "maxLength": 512},
                 "description": "up to 16 string pairs; idempotency_key makes a resubmission return the same batch"},
}, required=("input_file_id", "endpoint", "completion_window"))

#: OpenAI's own bound on the texts of one embeddings request
MAX_EMBEDDING_INPUTS = 2048
#: the widest ``dimensions`` taken (the model's own width bounds it further)
MAX_DIMENSIONS = 65536
EMBEDDING_REQUEST = BodyModel("EmbeddingRequest", {
    "model": {"type": "string", "minLength": 1},
    "input": {"oneOf": [{"type": "string"}, {**TEXTS, "maxItems": MAX_EMBEDDING_INPUTS}]},
    "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
    "dimensions": {"type": "integer", "minimum": 1, "maximum": MAX_DIMENSIONS,
                   "description": "keep the first N values, rescaled to length 1 (at most the model's width)"},
    "user": {"type": "string"},
}, required=("model", "input"))

#: a row's sampling parameters (the contract's ``Params``), as OpenAI's bodies name them
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "stop", "seed", "n", "logprobs", "response_format")
_PARAMS = json_schema(Params)
#: OpenAI's sampling fields, as a chat or text completion takes them (bounds: the generate task's contract)
_SAMPLING = {
    **{name: _PARAMS[name] for name in SAMPLING if name != "logprobs"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                       "additionalProperties": False},
    "user": {"type": "string"}, "model": {"type": "string", "minLength": 1},
}
CHAT_REQUEST = BodyModel("ChatCompletionRequest", {
    **_SAMPLING,
    "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "items": {
        "type": "object", "required": ["role", "content"],
        # content: a string, or OpenAI's text parts ([{"type": "text", "text": ...}])
        "properties": {**json_schema(ChatMessage, ["role"]), "content": {"oneOf": [
            json_schema(ChatMessage, ["content"])["content"], {"type": "array", "items": {"type": "object"}}]}}}},
    "max_completion_tokens": _PARAMS["max_tokens"],
    "logprobs": {"type": "boolean"}, "top_logprobs": _PARAMS["logprobs"]["anyOf"][0],
}, required=("model", "messages"))
COMPLETION_REQUEST = BodyModel("CompletionRequest", {
    **_SAMPLING,
    "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                               "maxItems": 1}]},
    "logprobs": _PARAMS["logprobs"],
    "echo": {"const": False}, "suffix": {"type": "null"}, "best_of": {"const": 1},
}, required=("model", "prompt"))

_TEXT_PARTS = {"type": "array", "items": {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"type": "string", "enum": ["input_text", "output_text"]}, "text": {"type": "string"}}}}
RESPONSE_REQUEST = BodyModel("ResponseRequest", {
    "model": {"type": "string", "minLength": 1},
    "input": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"], "properties": {
            "type": {"const": "message"}, "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
            "content": {"oneOf": [{"type": "string"}, _TEXT_PARTS]}}}}]},
    "instructions": {"type": "string", "description": "a system message before the input"},
    "max_output_tokens": _PARAMS["max_tokens"],
    "temperature": _PARAMS["temperature"],
    "top_p": _PARAMS["top_p"],
    "text": {"type": "object", "properties": {"format": {"type": "object", "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]}, "name": {"type": "string"},
        "schema": {"type": "object"}, "strict": {"type": "boolean"}, "description": {"type": "string"}}}}},
    "metadata": {"type": ["object", "null"], "maxProperties": 16, "propertyNames": {"maxLength": 64},
                 "additionalProperties": {"type": "string", "maxLength": 512}},
    "user": {"type": "string"}, "store": {"type": "boolean", "description": "taken; nothing is stored"},
    "stream": {"const": False},
}, required=("model", "input"))

BODIES = (JOB_REQUEST, INFER_REQUEST, MODEL_REGISTRATION, BATCH_REQUEST, EMBEDDING_REQUEST, CHAT_REQUEST,
          COMPLETION_REQUEST, RESPONSE_REQUEST)
