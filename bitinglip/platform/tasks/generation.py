"""Generation rows and their sampling parameters.

A generation row is a prompt (the text column) or a chat (``messages``: a
list of ``{"role", "content"}``, rendered with the tokenizer's chat
template), with optional per-row sampling parameters (``params``: a dict
overriding the job's options, named as OpenAI names them, since every line
of an OpenAI batch file carries its own).  Everything here is checked with
the same bounds whether it comes as a job option or in a row: a bad job
option fails the submission, a bad row goes to the errors table naming the
row and the parameter.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bitinglip.errors import InputError
from bitinglip.platform.tasks.contract import (
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_SCHEMA_BYTES,
    MAX_STOP_CHARS,
    MAX_STOPS,
    ROLES,
    Sampling,
    bound,
    bounded,
    defaults,
    python_type,
)
from bitinglip.platform.tasks.options import bounded_value, strings, surrogate_at

#: the sampling parameters a job sets for all rows and a row may override (declared in the contract)
SAMPLING_DEFAULTS: Mapping[str, Any] = defaults(Sampling)
#: accepted for max_tokens (the name of BitingLip's first releases, and of transformers)
ALIASES = {"max_new_tokens": "max_tokens"}


def check_param(name: str, value: Any, where: str = "option", given: str | None = None) -> Any:
    """One sampling parameter, bounded (``where`` prefixes the message: "option" or "row 7: params";
    ``given``: the name the caller used, an alias of ``name``)."""
    try:
        return _CHECKS[name](given or name, value)
    except InputError as exc:
        text = str(exc)
        error = InputError(text.replace("option ", f"{where} ", 1) if where != "option" else text)
        error.param = given or name  # type: ignore[attr-defined]  # OpenAI's error names the field
        raise error from None


def _fmt(name: str, value: Any) -> dict[str, Any] | None:
    """OpenAI's ``response_format``: text (no constraint), json_object, or a json_schema."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise InputError(f"option {name}: expected {{\"type\": \"json_object\"}} or "
                         f"{{\"type\": \"json_schema\", \"json_schema\": {{\"schema\": {{...}}}}}}; got {value!r:.80}")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return {"type": "json_object"}
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise InputError(f"option {name}: a json_schema response format needs json_schema.schema, an object")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError) as exc:
        raise InputError(f"option {name}: the schema is not JSON: {exc}") from None
    if size > MAX_SCHEMA_BYTES:
        raise InputError(f"option {name}: the schema takes {size} bytes, over the limit of {MAX_SCHEMA_BYTES}")
    return {"type": "json_schema", "json_schema": {"schema": json.loads(json.dumps(schema))}}


def schema_key(schema: Mapping[str, Any]) -> str:
    """The sha256 of a JSON schema's canonical JSON (sorted keys, no spaces):
    one key for the same schema however its keys are ordered."""
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _logprobs(name: str, value: Any) -> int | None:
    if value is None or value is False:
        return None
    if value is True:  # OpenAI's chat API: logprobs true, the top count apart
        return 0
    return _numbers["logprobs"](name, value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"option {name}={value!r:.60}: expected true or false")
    return value


def _number(name: str) -> Any:
    b, kind = bound(Sampling, name), python_type(Sampling, name)
    return lambda n, v: bounded_value(n, v, b, kind)


#: every numeric parameter, checked against its range in the contract
_numbers: dict[str, Any] = {name: _number(name) for name, _ in bounded(Sampling)}
_CHECKS: dict[str, Any] = {
    **_numbers,
    "stop": lambda n, v: () if v is None else strings(n, v, MAX_STOPS, MAX_STOP_CHARS),
    "seed": lambda n, v: None if v is None else _numbers["seed"](n, v),
    "logprobs": _logprobs,
    "response_format": _fmt,
    "ignore_eos": _flag,
}
assert set(_CHECKS) == set(Sampling.model_fields), "a contract field without its check"


def check_sampling(options: Mapping[str, Any], where: str = "option") -> dict[str, Any]:
    """The sampling parameters among ``options``, checked; aliases renamed."""
    out: dict[str, Any] = {}
    for raw, value in options.items():
        name = ALIASES.get(raw, raw)
        if name not in _CHECKS:
            continue
        if raw != name and name in options:
            raise InputError(f"{where} {raw} and {name} are the same parameter; give one")
        out[name] = check_param(name, value, where, raw)
    return out


@dataclass(frozen=True)
class GenRow:
    """A checked row: a prompt or a chat, and its own parameters."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_list(value: Any) -> list[Any] | None:
    """Lists, tuples and numpy arrays (Parquet's list columns) as a list."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1:
        return list(value)
    return None


#: parameters that are whole numbers
WHOLE = (*(name for name in Sampling.model_fields if python_type(Sampling, name) is int), *ALIASES)


def _plain(name: str, value: Any) -> Any:
    """A value read from a file as the row meant it: Parquet gives a struct
    field of whole numbers with nulls in other rows as floats (11.0), and
    lists as numpy arrays; numpy scalars become Python numbers."""
    items = _as_list(value)
    if items is not None:
        return [_plain(name, v) for v in items]
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        value = value.item()
    if name in WHOLE and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check_messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    items = _as_list(value)
    if items is None or not items or len(items) > MAX_MESSAGES:
        raise InputError(f"{where}: messages must be a list of 1 to {MAX_MESSAGES} {{role, content}} objects, "
                         f"got {value!r:.80}")
    out = []
    for i, item in enumerate(items):
        role = item.get("role") if isinstance(item, Mapping) else None
        content = item.get("content") if isinstance(item, Mapping) else None
        if role not in ROLES:
            raise InputError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r:.40}")
        if not isinstance(content, str) or len(content) > MAX_MESSAGE_CHARS:
            raise InputError(f"{where}: messages[{i}].content must be a string of at most {MAX_MESSAGE_CHARS} "
                             f"characters, got {type(content).__name__}")
        at = surrogate_at(content)
        if at is not None:
            raise InputError(f"{where}: messages[{i}].content is not valid Unicode (a lone surrogate at "
                             f"character {at})")
        out.append((str(role), content))
    return tuple(out)


def check_row(text: Any, messages: Any, params: Any, row_id: Any, job: Mapping[str, Any]) -> GenRow:
    """A generation row from its columns, or an :class:`InputError` naming
    the row and what is wrong.  ``job``: the job's checked options (a row
    may ask for ``n`` or ``logprobs`` only where the job's output columns
    hold them)."""
    where = f"row id={row_id!r}"
    row_params: dict[str, Any] = {}
    if not _missing(params):
        if not isinstance(params, Mapping):
            raise InputError(f"{where}: params must be an object of sampling parameters, got {params!r:.60}")
        # Parquet's struct columns give every row every field, None where a row has none
        given = {k: _plain(k, v) for k, v in params.items() if not _missing(v)}
        unknown = sorted(set(given) - set(_CHECKS) - set(ALIASES))
        if unknown:
            raise InputError(f"{where}: params has no parameter {', '.join(map(repr, unknown))[:200]}; "
                             f"it takes {', '.join(sorted(_CHECKS))}")
        row_params = check_sampling(given, f"{where}: params")
        if row_params.get("n", 1) > 1 and int(job.get("n", 1)) == 1:
            raise InputError(f"{where}: params n={row_params['n']} needs the job option n above 1 "
                             "(its text column then holds a list for every row)")
        if row_params.get("logprobs") is not None and job.get("logprobs") is None:
            raise InputError(f"{where}: params logprobs needs the job option logprobs (which adds the "
                             "logprobs column)")
    has_messages = not _missing(messages) and not (isinstance(messages, str) and not messages)
    if has_messages:
        return GenRow(None, check_messages(messages, where), row_params)
    if _missing(text):
        raise InputError(f"{where}: the text is missing (null) and there are no messages")
    if not isinstance(text, str):
        raise InputError(f"{where}: expected text (str), got {type(text).__name__} {text!r:.60}")
    at = surrogate_at(text)
    if at is not None:
        raise InputError(f"{where}: the text is not valid Unicode (a lone surrogate {text[at]!r} at character {at})")
    return GenRow(text, None, row_params)


def merged_params(job: Mapping[str, Any], row: GenRow) -> dict[str, Any]:
    """The job's sampling parameters with the row's over them."""
    return {**{k: job.get(k, v) for k, v in SAMPLING_DEFAULTS.items()}, **row.params}


def render(tokenizer: Any, row: GenRow, model: str) -> list[int]:
    """The row's prompt as token ids: a chat through the tokenizer's chat
    template (refused where the model has none), a prompt as it is.

    In a chat, special tokens come from the template alone: a message that
    holds one's text (``<|im_start|>``) has it tokenized as plain text, so a
    user cannot forge a system or assistant turn."""
    if row.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"model {model!r} has no chat template: send rows with a text prompt, not messages")
        chat = [{"role": r, "content": c} for r, c in row.messages]
        specials = _special_texts(tokenizer)
        if any(t in c for _, c in row.messages for t in specials):
            return _render_apart(tokenizer, chat, model)
        # no special token's text in any message: the template's own tokenization, as it always was
        ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    ids = tokenizer(row.text)["input_ids"]
    if not ids:  # an empty prompt starts from the beginning-of-text token, as generate() would
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return list(ids)


#: stands for message i while the template is rendered (private-use characters: no template or tokenizer alters them)
_MARK = "\ue000{}\ue001"


def _special_texts(tokenizer: Any) -> list[str]:
    """The texts of the tokenizer's special tokens (``<|im_start|>``, ``<s>``...)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {t.content for t in added.values() if getattr(t, "special", False)}
    texts.update(getattr(tokenizer, "all_special_tokens", None) or ())
    return sorted(t for t in texts if t)


def _render_apart(tokenizer: Any, chat: list[dict[str, str]], model: str) -> list[int]:
    """The template rendered around marks, its text tokenized with special tokens and each message's content
    tokenized without (their text stays text)."""
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(chat)]
    template = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
    real = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    pieces: list[tuple[str, bool]] = []  # (text, is a message's content)
    rest = template
    for i, message in enumerate(chat):
        before, found, rest = rest.partition(_MARK.format(i))
        if not found:
            break
        pieces += [(before, False), (message["content"], True)]
    pieces.append((rest, False))
    if "".join(text for text, _ in pieces) != real:  # the template changes a message (trims it, repeats it...)
        raise InputError(f"a message holds the text of a special token of model {model!r} (such as "
                         f"{_special_texts(tokenizer)[0]!r}) and its chat template does not keep messages as they "
                         "are, so it cannot be kept as text: remove it")
    ids: list[int] = []
    for text, content in pieces:
        if text:
            ids += tokenizer(text, add_special_tokens=False, split_special_tokens=content)["input_ids"]
    return ids


def prefix_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The positions of ``prompts`` (token ids, the chat template applied)
    in an order that puts prompts sharing a prefix next to each other: a
    stable sort by the ids themselves, so a longer shared prefix keeps rows
    closer, and rows with equal prompts keep their order.

    vLLM's prefix cache reuses a prefix's KV blocks only while they are
    still cached when the next row with it is scheduled; handed over
    grouped, the rows of one prefix run in the same steps.  The ids are
    the ones the engine gets (rendered once, on the worker), so nothing is
    tokenized twice and a chat's template is what groups its rows."""
    return sorted(range(len(prompts)), key=lambda i: prompts[i])


def fit(ids: Sequence[int], max_tokens: int, positions: int) -> tuple[list[int], bool]:
    """A prompt cut to leave room for ``max_tokens`` new tokens in the
    model's ``positions``, keeping its end (what the continuation follows
    from); and whether it was cut."""
    limit = max(1, positions - max_tokens)
    return (list(ids[-limit:]), True) if len(ids) > limit else (list(ids), False)
