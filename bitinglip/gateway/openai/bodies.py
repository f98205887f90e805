"""OpenAI's request bodies (batches, embeddings, chat and text completions,
responses) and a batch file's line, as pydantic models whose sampling fields
are the generate task's contract (:class:`~bitinglip.platform.tasks.Params`):
a bound is written there once.  The online routes and the batch file's lines
validate a body with the same model (:func:`~bitinglip.gateway.schemas.parse`),
so the two cannot disagree about a field.  The checks whose words users and
tests read (metadata, a Responses ``input`` and ``text``) run inside the
models as validators that raise :func:`~bitinglip.gateway.schemas.refuse`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, StringConstraints, create_model, model_validator

from bitinglip.gateway.schemas import Name, Strict, optional, refuse, required
from bitinglip.platform.tasks import MAX_MESSAGES, ChatMessage, Params

#: the endpoints a batch may run (OpenAI's names); the chat and text completions and responses need generation
#: rows (issue 16)
BATCH_ENDPOINTS = ("/v1/embeddings", "/v1/chat/completions", "/v1/completions", "/v1/responses")
#: OpenAI's bounds on a file's or a batch output's expiry
EXPIRES_MIN_S, EXPIRES_MAX_S = 3600, 30 * 86400
#: OpenAI's own bound on the texts of one embeddings request
MAX_EMBEDDING_INPUTS = 2048
#: the widest ``dimensions`` taken (the model's own width bounds it further)
MAX_DIMENSIONS = 65536
#: a row's sampling parameters (the contract's ``Params``), as OpenAI's bodies name them
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "stop", "seed", "n", "logprobs", "response_format")
#: OpenAI's bounds on ``metadata`` (Batch and Response alike)
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
_CUSTOM_ID_CHARS = 512


def check_metadata(metadata: Any, param: str = "metadata") -> dict[str, str] | None:
    """``metadata`` within OpenAI's limits (16 pairs, keys up to 64
    characters, values up to 512, all strings); the error names the key."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise refuse(f"{param} must be an object of string pairs", param)
    if len(metadata) > METADATA_PAIRS:
        raise refuse(f"{param} has {len(metadata)} pairs; the limit is {METADATA_PAIRS}", param)
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS:
            raise refuse(f"{param} key {key[:40]!r}... has {len(key)} characters; the limit is "
                         f"{METADATA_KEY_CHARS}", param)
        if not isinstance(value, str):
            raise refuse(f"{param}[{key!r}] must be a string, got {type(value).__name__}", param)
        if len(value) > METADATA_VALUE_CHARS:
            raise refuse(f"{param}[{key!r}] has {len(value)} characters; the limit is {METADATA_VALUE_CHARS}", param)
    return metadata


Metadata = Annotated[
    Annotated[dict[Annotated[str, StringConstraints(max_length=METADATA_KEY_CHARS)],
                   Annotated[str, StringConstraints(max_length=METADATA_VALUE_CHARS)]],
              Field(max_length=METADATA_PAIRS)] | None,
    BeforeValidator(check_metadata), Field(None, description=f"up to {METADATA_PAIRS} string pairs")]


class ExpiresAfter(Strict):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=EXPIRES_MIN_S, le=EXPIRES_MAX_S)


class BatchRequest(Strict):
    """``POST /v1/batches``."""

    input_file_id: Name = Field(description="a file uploaded with purpose=batch")
    endpoint: Literal[BATCH_ENDPOINTS]  # type: ignore[valid-type]
    completion_window: Literal["24h"]
    output_expires_after: ExpiresAfter | None = Field(
        None, description="the output and error files expire this long after they are written")
    metadata: Metadata = Field(None, description=f"up to {METADATA_PAIRS} string pairs; idempotency_key makes a "
                                                 "resubmission return the same batch")


def _dimensions(value: Any) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 1 <= value <= MAX_DIMENSIONS):
        raise refuse("dimensions must be a whole number from 1 up to the model's size", "dimensions")
    return value


class EmbeddingRequest(Strict):
    """``POST /v1/embeddings``."""

    model: Name
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    # not nullable (OpenAI's is not): left out, it is None
    dimensions: Annotated[int, Field(ge=1, le=MAX_DIMENSIONS), BeforeValidator(_dimensions)] = Field(
        None, description="keep the first N values, rescaled to length 1 (at most the model's width)")
    user: str | None = None


# --- chat and text completions


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    """A chat message: the contract's role, and its content as a string or OpenAI's text parts."""

    # other fields are let through unread: a client that sends an answer back as the next turn's message sends
    # the answer's refusal, tool_calls and annotations along (openai-python does)
    model_config = ConfigDict(extra="ignore")

    role: required(ChatMessage, "role")  # type: ignore[valid-type]
    content: required(ChatMessage, "content") | list[TextPart]  # type: ignore[valid-type]


class StreamOptions(Strict):
    include_usage: bool | None = None


#: the sampling fields a chat or text completion takes (the contract's), and those both take
_Completion: Any = create_model(
    "_Completion", __base__=Strict, model=(Name, ...),
    **{name: optional(Params, name) for name in SAMPLING if name != "logprobs"},
    stream=(bool | None, None), stream_options=(StreamOptions | None, None), user=(str | None, None))


class ChatCompletionRequest(_Completion):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: optional(Params, "max_tokens")  # type: ignore[valid-type]
    #: chat: logprobs is a flag, top_logprobs the count
    logprobs: bool | None = None
    top_logprobs: optional(Params, "logprobs")  # type: ignore[valid-type]


class CompletionRequest(_Completion):
    """``POST /v1/completions``: one prompt; echo, suffix and best_of only at their defaults."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: optional(Params, "logprobs")  # type: ignore[valid-type]
    echo: Literal[False] | None = None
    suffix: None = None
    best_of: Literal[1] | None = None


# --- responses

RESPONSE_ROLES = ("user", "assistant", "system", "developer")
_PART_TYPES = ("input_text", "output_text", "text")


def _messages_only(items: Any) -> Any:
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise refuse(f"input[{i}] must be a message ({{\"role\", \"content\"}}); other item types (tool calls, "
                         "reasoning) are not taken", "input")
    return items


def _no_stream(value: Any) -> Any:
    if value not in (None, False) or isinstance(value, int) and not isinstance(value, bool):
        raise refuse("stream is not served on /v1/responses; leave it out (chat completions stream)", "stream")
    return value


class InputPart(Strict):
    model_config = ConfigDict(extra="ignore")  # an output_text part sent back has annotations and logprobs
    type: Literal[_PART_TYPES]  # type: ignore[valid-type]
    text: str


class InputMessage(Strict):
    model_config = ConfigDict(extra="ignore")  # as a chat Message: an earlier output item sent back has id, status
    type: Literal["message"] = "message"
    role: Literal[RESPONSE_ROLES]  # type: ignore[valid-type]
    content: str | list[InputPart]


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, fmt: Any) -> Any:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise refuse("text.format.type must be text, json_object or json_schema", "text.format")
        if fmt["type"] == "json_schema" and not isinstance(fmt.get("schema"), dict):
            raise refuse("text.format.schema must be a JSON schema (an object)", "text.format.schema")
        if fmt["type"] == "json_schema" and (not isinstance(fmt.get("name"), str) or not fmt["name"]):
            raise refuse("text.format.name is required for a json_schema format (a string)", "text.format.name")
        return fmt


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponseRequest(Strict):
    """``POST /v1/responses``: text output on the chat path; nothing is stored."""

    model: Name
    input: Annotated[str | Annotated[list[InputMessage], Field(min_length=1)], BeforeValidator(_messages_only)]
    instructions: str | None = Field(None, description="a system message before the input")
    max_output_tokens: optional(Params, "max_tokens")  # type: ignore[valid-type]
    temperature: optional(Params, "temperature")  # type: ignore[valid-type]
    top_p: optional(Params, "top_p")  # type: ignore[valid-type]
    text: TextConfig | None = None
    metadata: Metadata = None
    user: str | None = None
    store: bool | None = Field(None, description="taken; nothing is stored")
    stream: Annotated[Literal[False] | None, BeforeValidator(_no_stream)] = None


class BatchLine(Strict):
    """One line of a batch file."""

    custom_id: Annotated[str, StringConstraints(min_length=1, max_length=_CUSTOM_ID_CHARS)]
    method: Literal["POST"] = "POST"
    url: str
    body: dict[str, Any]


#: each endpoint's body
REQUESTS: dict[str, type[Strict]] = {"/v1/embeddings": EmbeddingRequest, "/v1/chat/completions": ChatCompletionRequest,
                                     "/v1/completions": CompletionRequest, "/v1/responses": ResponseRequest}
