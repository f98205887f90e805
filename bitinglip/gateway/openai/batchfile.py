"""A batch file, checked line by line and turned into a job's input.

Each line is ``{"custom_id", "method": "POST", "url", "body"}``.  What makes
the file as a whole unusable fails the batch, naming its line (as OpenAI
does): not JSON, a missing or repeated ``custom_id``, another url than the
batch's endpoint, a second model.  A line whose body is wrong (an ``input``
that is not text, an unknown field) is the line's own error: it goes to the
batch's error file and the rest runs.  A ``dimensions`` past the model's
width is such a line where this gateway can read the model's config (else
the batch's finalize refuses it, line by line).  Nothing of a line is
written before it passes: a lone surrogate anywhere in it (JSON's
``"\\ud800"``), which no UTF-8 file takes, or nesting past the request
bodies' bound is refused first.  Read and written streaming, so a file of
200 MB never sits in memory whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from bitinglip.errors import BitingLipError, InputError
from bitinglip.gateway.body import MAX_DEPTH, depth, lone_surrogate
from bitinglip.gateway.openai.bodies import SAMPLING, BatchLine, EmbeddingRequest
from bitinglip.gateway.openai.responses_api import RESPONSES_ENDPOINT, chat_request
from bitinglip.gateway.openai.shapes import embedding_texts, generation_row
from bitinglip.gateway.schemas import parse, refuse
from bitinglip.platform.models import resolve_listed, resolve_model
from bitinglip.platform.tasks import BUILTIN_TASKS, Params, bound, model_limits, python_type, schema_key, surrogate_at
from bitinglip.settings import Settings

#: the job's input (``id`` = the line's custom_id, ``text``), beside the job's output
INPUT = "_openai_input.parquet"
#: one JSON object per line that runs: custom_id, line number, embeddings expected, format, dimensions
LINES = "_openai_lines.jsonl"
#: one JSON object per line refused for its body: custom_id, line number, message, param
REJECTED = "_openai_rejected.jsonl"
#: the most bytes one line may take (the body of one request)
MAX_LINE_BYTES = 8 << 20
#: the most file-level errors a failed batch lists (OpenAI lists a few, not thousands)
MAX_ERRORS = 100
_ROWS_PER_WRITE = 4096
#: a generation row's params in the job's Parquet input: one type per field (Parquet keeps one per column),
#: the contract's
_PARAM_TYPES: dict[str, Any] = {name: python_type(Params, name) for name in SAMPLING}
#: a Response's fields that come from its request (:func:`~.responses_api.response_body`)
RESPONSE_ECHO = ("instructions", "max_output_tokens", "temperature", "top_p", "text", "metadata", "user")
#: the file-level error of a line whose envelope is wrong, by the field at fault
_ENVELOPE_CODES = {"custom_id": "missing_custom_id", "method": "invalid_method", "url": "invalid_url"}


@dataclass
class Checked:
    """What a batch file turned into."""

    model: str | None = None
    #: the line that first named the model
    model_line: int | None = None
    lines: int = 0
    rows: int = 0
    rejected: int = 0
    #: file-level errors ({code, message, line, param}); any of them fails the batch
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: the job options the rows need (generation: the most ``n`` and ``logprobs`` any row asks for)
    options: dict[str, Any] = field(default_factory=dict)

    def fail(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "line": line, "param": param})


def _line_error(raw: bytes, number: int, endpoint: str, seen: set[str], checked: Checked) -> dict[str, Any] | None:
    """The line's request, or None after recording why the file fails there."""
    try:
        line = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # the parser recurses per level: about 1,000 "[" exhaust its stack
        checked.fail("invalid_json_line", f"line {number} nests deeper than {MAX_DEPTH} levels", number)
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        checked.fail("invalid_json_line", f"line {number} is not valid JSON: {exc}", number)
        return None
    if not isinstance(line, dict):
        checked.fail("invalid_request", f"line {number} must be a JSON object", number)
        return None
    if depth(line) > MAX_DEPTH:  # a request body's bound: every later walk of the line recurses as deep
        checked.fail("invalid_json_line", f"line {number} nests deeper than {MAX_DEPTH} levels", number)
        return None
    custom_id = line.get("custom_id")
    if isinstance(custom_id, str) and surrogate_at(custom_id) is not None:  # the output and error files are UTF-8
        checked.fail("invalid_custom_id", f"line {number}: custom_id {custom_id!r} is not valid Unicode (a lone "
                     f"surrogate at character {surrogate_at(custom_id)})", number, "custom_id")
        return None
    try:
        envelope = parse(BatchLine, line)
    except InputError as exc:
        param = getattr(exc, "param", None)
        checked.fail(_ENVELOPE_CODES.get(param, "invalid_request"), f"line {number}: {exc}", number, param)
        return None
    custom_id = envelope.custom_id
    if custom_id in seen:
        checked.fail("duplicate_custom_id", f"line {number} repeats custom_id {custom_id!r}", number, "custom_id")
        return None
    seen.add(custom_id)
    if envelope.url != endpoint:
        checked.fail("invalid_url", f"line {number} has url {envelope.url!r}; this batch's endpoint is "
                     f"{endpoint}", number, "url")
        return None
    return line


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # as a request body: Python's json takes NaN, JSON does not


def model_width(model: str, settings: Settings) -> int | None:
    """The width of ``model``'s embeddings where this gateway can read its
    ``config.json``; None where it cannot (a model only the workers see)."""
    try:
        return model_limits(resolve_model(resolve_listed(model, settings), settings).path).hidden
    except (BitingLipError, OSError):
        return None


def check_embeddings(src: IO[bytes], out_dir: str, endpoint: str, max_lines: int, max_chars: int,
                     width: Callable[[str], int | None] | None = None) -> Checked:
    """Check an embeddings batch file from ``src`` and write the job's input
    (:data:`INPUT`), the lines that run (:data:`LINES`) and the refused ones
    (:data:`REJECTED`) into ``out_dir``.  ``width(model)``: the model's
    embedding width, to refuse a larger ``dimensions`` here (None: not known)."""
    import pyarrow as pa

    widths: dict[str, int | None] = {}

    def accept(custom_id: str, raw: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        body = parse(EmbeddingRequest, raw)
        found = embedding_texts(body, max_chars)
        fmt, dims = body.encoding_format, body.dimensions
        if dims is not None and width is not None:
            model = body.model  # one per batch: its config is read once
            limit = widths[model] if model in widths else widths.setdefault(model, width(model))
            if limit is not None and dims > limit:
                raise refuse(f"dimensions={dims} is more than model {model}'s {limit}", "dimensions")
        # the rows of a list input share the line's id, in order
        return [{"id": custom_id, "text": t} for t in found], {"count": len(found), "fmt": fmt, "dims": dims}

    return _check(src, out_dir, endpoint, max_lines, pa.schema([("id", pa.string()), ("text", pa.string())]),
                  accept, Checked(options={"count_tokens": True}))  # each line's usage.prompt_tokens


def check_generation(src: IO[bytes], out_dir: str, endpoint: str, max_lines: int, max_chars: int,
                     max_schemas: int = 16) -> Checked:
    """Check a chat or text completions or responses batch file: each line
    one row of the generation row contract (``messages`` or ``text``, and
    ``params``).  At most ``max_schemas`` distinct json_schema formats (by
    their canonical JSON): a line with one more is that line's error."""
    task = BUILTIN_TASKS["generate"]
    schemas: set[str] = set()
    # every row is checked as a job that allows n and logprobs would take it; the job then asks for the most any row asks
    loose = task.check_options({name: bound(Params, name).high for name in ("n", "logprobs")})
    checked = Checked(options={})

    def accept(custom_id: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        meta: dict[str, Any] = {"count": 1}
        if endpoint == RESPONSES_ENDPOINT:  # a chat underneath; its Response echoes these fields of the line
            row = generation_row("/v1/chat/completions", chat_request(body), custom_id, max_chars)
            meta["echo"] = {k: body[k] for k in RESPONSE_ECHO if body.get(k) is not None}
        else:
            row = generation_row(endpoint, body, custom_id, max_chars)
        good = task.check_row(row.get("text"), {"messages": row.get("messages"), "params": row["params"]},
                              custom_id, loose)
        params = {k: _PARAM_TYPES[k](v) for k, v in good.params.items() if k in _PARAM_TYPES and v is not None}
        schema = (params.get("response_format") or {}).get("json_schema", {}).get("schema")
        if schema is not None and schema_key(schema) not in schemas:
            if len(schemas) >= max_schemas:
                raise refuse(f"this line's json_schema would be one more distinct schema than the "
                             f"{max_schemas} a batch takes (BITINGLIP_BATCH_MAX_SCHEMAS)", "response_format")
            schemas.add(schema_key(schema))
        if "response_format" in params:  # a JSON text: its schema's shape differs from row to row
            params["response_format"] = json.dumps(params["response_format"])
        # said even when it is 1: a row without it would take the job's n, the most of any row's (and vLLM
        # refuses n > 1 for a greedy row)
        params.setdefault("n", 1)
        for name in ("n", "logprobs"):
            if name in params and params[name] > int(checked.options.get(name) or (1 if name == "n" else -1)):
                checked.options[name] = params[name]
        messages = [{"role": r, "content": c} for r, c in good.messages] if good.messages is not None else None
        return ([{"id": custom_id, "text": good.text, "messages": messages, "params": params}],
                {**meta, "logprobs": "logprobs" in params})

    return _check(src, out_dir, endpoint, max_lines, _generation_schema(), accept, checked)


def generation_frame(path: str) -> Any:
    """The generation rows of :data:`INPUT` as a pandas frame of plain Python
    values (dicts, lists, ints).  Read through Dask, a Parquet struct column
    comes back with its null-bearing int fields as floats (``seed`` 11.0) and
    its lists as numpy arrays, which the generate task's row check refuses;
    so a generation batch runs on this frame (a resume reads the file)."""
    import pandas as pd
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["params"] = {k: v for k, v in (row["params"] or {}).items() if v is not None}
        if isinstance(row["params"].get("response_format"), str):  # JSON text (an older input: a struct)
            row["params"]["response_format"] = json.loads(row["params"]["response_format"])
    return pd.DataFrame(rows, columns=["id", "text", "messages", "params"])


def _generation_schema() -> Any:
    import pyarrow as pa

    kinds = {int: pa.int64(), float: pa.float64()}
    # response_format as JSON text: a json_schema's schema has its own shape per row, and a column one type
    params = [(k, kinds[t] if t in kinds else pa.list_(pa.string()) if k == "stop" else pa.string())
              for k, t in _PARAM_TYPES.items()]
    return pa.schema([("id", pa.string()), ("text", pa.string()),
                      ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                      ("params", pa.struct(params))])


def _check(src: IO[bytes], out_dir: str, endpoint: str, max_lines: int, schema: Any, accept: Any,
           checked: Checked) -> Checked:
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    seen = set[str]()
    rows: list[dict[str, Any]] = []
    with pq.ParquetWriter(os.path.join(out_dir, INPUT), schema) as writer, \
            open(os.path.join(out_dir, LINES), "w") as lines, open(os.path.join(out_dir, REJECTED), "w") as rejected:
        while True:
            raw = src.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            checked.lines += 1
            number = checked.lines
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                checked.fail("line_too_long", f"line {number} is over {MAX_LINE_BYTES} bytes", number)
                while raw and not raw.endswith(b"\n"):  # skip the rest of it
                    raw = src.readline(MAX_LINE_BYTES)
                continue
            if not raw.strip():
                checked.fail("empty_line", f"line {number} is empty", number)
                continue
            if checked.lines > max_lines:
                checked.fail("too_many_lines", f"the file has more than {max_lines} lines "
                             "(BITINGLIP_BATCH_MAX_LINES)", number)
                break
            line = _line_error(raw, number, endpoint, seen, checked)
            if line is None:
                continue
            body = line["body"]
            where = lone_surrogate(body, "body")
            if where is not None:  # no UTF-8 file, Redis key or tokenizer takes it
                checked.rejected += 1
                rejected.write(json.dumps({"custom_id": line["custom_id"], "line": number, "param": where,
                                           "message": f"{where} is not valid Unicode (a lone surrogate)"}) + "\n")
                continue
            model = body.get("model")
            if isinstance(model, str) and model:
                if checked.model is None:
                    checked.model, checked.model_line = model, number
                elif model != checked.model:  # one job per batch: one model
                    checked.fail("mixed_models", f"line {number} names model {model!r}, line {checked.model_line} "
                                 f"names {checked.model!r}; a batch runs one model", number, "body.model")
                    continue
            try:
                found, meta = accept(line["custom_id"], body)
            except InputError as exc:
                checked.rejected += 1
                rejected.write(json.dumps({"custom_id": line["custom_id"], "line": number, "message": str(exc),
                                           "param": getattr(exc, "param", None)}) + "\n")
                continue
            lines.write(json.dumps({"custom_id": line["custom_id"], "line": number, **meta}) + "\n")
            rows += found
            if len(rows) >= _ROWS_PER_WRITE:
                checked.rows += _flush(writer, schema, rows)
        checked.rows += _flush(writer, schema, rows)
    if checked.lines == 0:
        checked.fail("empty_file", "the batch file has no lines", None)
    return checked


def _flush(writer: Any, schema: Any, rows: list[dict[str, Any]]) -> int:
    import pyarrow as pa

    n = len(rows)
    if n:
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        rows.clear()
    return n


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The objects of a JSONL file this module wrote (an absent file: none)."""
    try:
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []
