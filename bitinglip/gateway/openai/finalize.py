"""A finished batch's output and error files, written from its job's folder.

The job's rows keep their line's ``custom_id`` as their ``id`` and the
lines' order, so one pass over the committed Parquet files, beside one pass
over the lines that ran, puts each line in exactly one of the two files:
every row of it came out (the output file), or not (the error file, with
the row's reason, or why it never ran).  A line whose rows came out but
whose response cannot be made of them (``dimensions`` past the model's
width, where the gateway could not read the model's config up front) is
that line's error: nothing in one line fails the batch's files.  The lines refused for their body
join the error file in line order.  Works alike for a succeeded, failed or
cancelled job: only committed partitions are read.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from bitinglip.atomic import write_atomically
from bitinglip.errors import InputError
from bitinglip.gateway.openai.batchfile import LINES, REJECTED, read_jsonl
from bitinglip.gateway.openai.responses_api import RESPONSES_ENDPOINT, response_body
from bitinglip.gateway.openai.shapes import chat_body, completion_body, embedding_body
from bitinglip.platform.jobs import RECORD, committed_parts, committed_summary, read_json


@dataclass(frozen=True)
class Outcome:
    completed: int
    failed: int
    #: the tokens of the lines in the output file (the Batch's ``usage``)
    input_tokens: int = 0
    output_tokens: int = 0


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(input, output) tokens of one response's ``usage``, in any endpoint's words."""
    if not usage:
        return 0, 0
    return (int(usage.get("input_tokens", usage.get("prompt_tokens")) or 0),
            int(usage.get("output_tokens", usage.get("completion_tokens")) or 0))


def _rows(out_dir: str, job_id: str, embed: bool) -> tuple[Iterator[tuple[str, Any]], dict[str, str]]:
    """The job's committed output rows in order, ``(id, embedding)`` of an
    embed job, ``(id, row)`` of a generate job; and the reasons of its rows
    in error by id."""
    import pyarrow.parquet as pq

    record = read_json(os.path.join(out_dir, RECORD)) or {}
    summaries = [committed_summary(out_dir, i, job_id)
                 for i in sorted(committed_parts(out_dir, int(record.get("partitions") or 0)))]
    reasons: dict[str, str] = {}
    for s in summaries:
        if s is not None and s.get("errors_file"):
            table = pq.read_table(os.path.join(out_dir, s["errors_file"]), columns=["id", "reason"])
            reasons.update(zip(table.column("id").to_pylist(), table.column("reason").to_pylist()))

    def rows() -> Iterator[tuple[str, Any]]:
        for s in summaries:
            if s is None:
                continue
            for batch in pq.ParquetFile(os.path.join(out_dir, s["file"])).iter_batches(batch_size=2048):
                if embed:  # (embedding, its tokens): a job from before the tokens were counted has none
                    tokens = (batch.column("tokens").to_pylist() if "tokens" in batch.schema.names
                              else [None] * batch.num_rows)
                    yield from zip(batch.column("id").to_pylist(),
                                   zip(batch.column("embedding").to_pylist(), tokens))
                else:
                    yield from ((row["id"], row) for row in batch.to_pylist())

    return rows(), reasons


def _line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> str:
    return json.dumps({"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response,
                       "error": error}) + "\n"


def _failure(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}",
            "body": {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                               "param": param, "code": code}}}


def _body(endpoint: str, model: str, line: dict[str, Any], got: list[Any]) -> dict[str, Any]:
    """The OpenAI response body of one line from its rows' outputs."""
    if endpoint == "/v1/embeddings":
        tokens = [t for _, t in got]
        return embedding_body(model, [v for v, _ in got], line["fmt"], line["dims"],
                              None if None in tokens else sum(int(t) for t in tokens))
    row = dict(got[0])
    if not line.get("logprobs"):  # the job computed them for another line; this one did not ask
        row.pop("logprobs", None)
    if endpoint == RESPONSES_ENDPOINT:
        return response_body(model, row, line.get("echo") or {})
    return (chat_body if endpoint == "/v1/chat/completions" else completion_body)(model, row)


def write_files(out_dir: str, job_id: str, endpoint: str, model: str, output_path: str, error_path: str,
                not_run: tuple[str, str]) -> Outcome:
    """Write the output and error files of the batch run as job ``job_id``
    in ``out_dir``; ``not_run`` is the ``(code, message)`` of lines whose
    rows never ran (a cancelled or failed job)."""
    rejected = read_jsonl(os.path.join(out_dir, REJECTED))
    rows, reasons = _rows(out_dir, job_id, endpoint == "/v1/embeddings")
    pending: list[tuple[str, Any]] = []
    counts = {"completed": 0, "failed": 0, "input_tokens": 0, "output_tokens": 0}

    def take(custom_id: str, count: int) -> list[Any]:
        """The next rows while they are this line's (the output holds a line's rows together, in order)."""
        got: list[Any] = []
        while len(got) < count:
            if not pending:
                nxt = next(rows, None)
                if nxt is None:
                    break
                pending.append(nxt)
            if pending[0][0] != custom_id:
                break
            got.append(pending.pop(0)[1])
        return got

    def write(out: IO[str], err: IO[str]) -> None:
        queue = list(rejected)
        for line in read_jsonl(os.path.join(out_dir, LINES)):
            while queue and queue[0]["line"] < line["line"]:
                _reject(err, queue.pop(0))
            got = take(line["custom_id"], int(line["count"]))
            if len(got) == int(line["count"]):
                try:
                    body = _body(endpoint, model, line, got)
                except Exception as exc:  # noqa: BLE001 - whatever it is, it is this line's alone
                    counts["failed"] += 1
                    refused = isinstance(exc, InputError)
                    err.write(_line(line["custom_id"], _failure(
                        400 if refused else 500, "invalid_input" if refused else "response_failed",
                        f"line {line['line']}: {exc}" if refused else f"line {line['line']}: its response could "
                        f"not be made: {type(exc).__name__}: {exc}", getattr(exc, "param", None)), None))
                    continue
                out.write(_line(line["custom_id"], {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}",
                                                    "body": body}, None))
                counts["completed"] += 1
                tokens_in, tokens_out = _tokens(body.get("usage"))
                counts["input_tokens"] += tokens_in
                counts["output_tokens"] += tokens_out
                continue
            counts["failed"] += 1
            reason = reasons.get(line["custom_id"])
            if reason is not None:
                err.write(_line(line["custom_id"], _failure(500, "row_failed", reason), None))
            else:
                err.write(_line(line["custom_id"], None, {"code": not_run[0], "message": not_run[1]}))
        for item in queue:
            _reject(err, item)

    def _reject(err: IO[str], item: dict[str, Any]) -> None:
        counts["failed"] += 1
        err.write(_line(item["custom_id"], _failure(400, "invalid_input", f"line {item['line']}: {item['message']}",
                                                    item.get("param")), None))

    def both(tmp_out: str) -> None:
        def errors(tmp_err: str) -> None:
            with open(tmp_out, "w") as out, open(tmp_err, "w") as err:
                write(out, err)
        write_atomically(error_path, errors)

    write_atomically(output_path, both)
    return Outcome(**counts)
