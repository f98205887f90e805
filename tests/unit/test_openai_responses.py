"""OpenAI's Responses API and the batch-file additions without a gateway: a
Responses body to a chat row, an output row to a ``Response`` the official
client's type parses, ``text.format``/``response_format`` json_schema lines
in batch files, metadata's limits, and the one-text-per-schema cache."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from bitinglip.errors import InputError
from bitinglip.gateway.openai.batchfile import INPUT, LINES, REJECTED, check_generation, generation_frame, read_jsonl
from bitinglip.gateway.openai.responses_api import chat_request, check_metadata, response_body
from bitinglip.gateway.openai.shapes import generation_row
from bitinglip.platform.tasks import BUILTIN_TASKS, schema_key
from bitinglip.platform.tasks.engines.schema_texts import SchemaTexts

openai = pytest.importorskip("openai", reason="the official openai client is not installed (the dev extra pins it)")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["ok", "n"], "additionalProperties": False}


def _row(body: dict[str, Any]) -> dict[str, Any]:
    return generation_row("/v1/chat/completions", chat_request(body), "r", 10_000)


def test_a_responses_body_becomes_a_chat_row() -> None:
    row = _row({"model": "m", "input": "hello", "instructions": "be brief", "max_output_tokens": 9,
                "temperature": 0.3, "top_p": 0.9, "metadata": {"k": "v"}, "store": False,
                "text": {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}})
    assert row["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    params = row["params"]
    assert {k: params[k] for k in ("max_tokens", "temperature", "top_p", "n")} == {
        "max_tokens": 9, "temperature": 0.3, "top_p": 0.9, "n": 1}
    assert params["response_format"]["type"] == "json_schema"
    assert params["response_format"]["json_schema"]["schema"] == SCHEMA
    # the generate task takes it as a chat's response_format
    checked = BUILTIN_TASKS["generate"].check_row(None, {"messages": row["messages"], "params": params}, "r",
                                                  BUILTIN_TASKS["generate"].check_options({}))
    assert checked.params["response_format"] == {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    listed = _row({"model": "m", "input": [
        {"role": "developer", "content": "terse"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a "},
                                                         {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "c"}]}]})
    assert listed["messages"] == [{"role": "developer", "content": "terse"}, {"role": "user", "content": "a b"},
                                  {"role": "assistant", "content": "c"}]
    assert "response_format" not in _row({"model": "m", "input": "x", "text": {"format": {"type": "text"}}})["params"]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": "x", "tools": []}, "tools", "unknown field tools"),
    ({"input": "x", "stream": True}, "stream", "stream is not served"),
    ({"input": 3}, "input", "input must be a string"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input", "input[0] must be a message"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input", "input[0].role"),
    ({"input": [{"role": {}, "content": "x"}]}, "input", "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": {}, "text": ""}]}]}, "input", "input[0].content"),  # once a 500
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input",
     "input[0].content"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema", "schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": SCHEMA}}}, "text.format.name", "name"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format", "text.format.type"),
    ({"input": "x", "instructions": 5}, "instructions", "instructions must be a string"),
    ({"input": "x", "user": {"id": 1}}, "user", "user must be a string"),
    ({"input": "x", "store": "yes"}, "store", "store must be true or false"),
    ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "17 pairs"),
])
def test_bad_responses_bodies_name_their_field(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InputError) as caught:
        chat_request({"model": "m", **body})
    assert caught.value.param == param and words in str(caught.value)  # type: ignore[attr-defined]


def test_metadata_is_held_to_openais_limits() -> None:
    assert check_metadata({f"k{i}": "v" * 512 for i in range(16)}) is not None
    for bad, words in (({"k" * 65: "v"}, "65 characters; the limit is 64"),
                       ({"key": "v" * 513}, "metadata['key'] has 513 characters; the limit is 512"),
                       ({"key": 1}, "metadata['key'] must be a string"), (["x"], "an object")):
        with pytest.raises(InputError, match=words.replace("[", r"\[").replace("]", r"\]")):
            check_metadata(bad)


def test_an_output_row_becomes_a_response_the_client_parses() -> None:
    body = {"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 5, "metadata": {"a": "b"},
            "text": {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}}}
    parsed = openai.types.responses.Response.model_validate(response_body(
        "m", {"text": ["hello there"], "finish_reason": ["stop"], "prompt_tokens": 7, "completion_tokens": 3}, body))
    assert parsed.object == "response" and parsed.status == "completed" and parsed.id.startswith("resp_")
    assert parsed.output_text == "hello there" and parsed.output[0].content[0].type == "output_text"
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.total_tokens) == (7, 3, 10)
    assert parsed.instructions == "be brief" and parsed.metadata == {"a": "b"}
    assert parsed.text.format.type == "json_schema" and parsed.max_output_tokens == 5
    cut = openai.types.responses.Response.model_validate(response_body(
        "m", {"text": "hel", "finish_reason": "length", "prompt_tokens": 1, "completion_tokens": 5}, {"input": "x"}))
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def _batch(lines: list[dict[str, Any]], url: str) -> bytes:
    return "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body}) + "\n"
                   for i, body in enumerate(lines)).encode()


def test_json_schema_lines_of_chat_and_responses_batches_are_taken(tmp_path: Path) -> None:
    other = {"type": "object", "properties": {"word": {"type": "string", "enum": ["yes", "no"]}}}
    chat = [{"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 20,
             "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": s}}}
            for s in (SCHEMA, other)]
    chat.append({"model": "m", "messages": [{"role": "user", "content": "q"}], "response_format": {"type": "json_object"}})
    chat.append({"model": "m", "messages": [{"role": "user", "content": "q"}]})
    checked = check_generation(io.BytesIO(_batch(chat, "/v1/chat/completions")), str(tmp_path / "chat"),
                               "/v1/chat/completions", 100, 1000)
    assert (checked.errors, checked.rejected, checked.rows) == ([], 0, 4)
    frame = generation_frame(str(tmp_path / "chat" / INPUT))
    formats = [p.get("response_format") for p in frame["params"]]
    assert formats == [{"type": "json_schema", "json_schema": {"schema": SCHEMA}},
                       {"type": "json_schema", "json_schema": {"schema": other}}, {"type": "json_object"}, None]
    for params in frame["params"]:  # each row as the worker checks it
        BUILTIN_TASKS["generate"].check_row(None, {"messages": [{"role": "user", "content": "q"}], "params": params},
                                            "r", BUILTIN_TASKS["generate"].check_options({}))

    responses = [{"model": "m", "input": "q", "instructions": "be brief", "max_output_tokens": 20,
                  "text": {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA}}},
                 {"model": "m", "input": [{"role": "user", "content": "r"}], "metadata": {"k": "v"}},
                 {"model": "m", "input": "q", "tools": [{"type": "web_search"}]}]
    checked = check_generation(io.BytesIO(_batch(responses, "/v1/responses")), str(tmp_path / "resp"),
                               "/v1/responses", 100, 1000)
    assert (checked.errors, checked.rejected, checked.rows) == ([], 1, 2)
    rows = pq.read_table(tmp_path / "resp" / INPUT).to_pylist()
    assert rows[0]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    assert json.loads(rows[0]["params"]["response_format"])["json_schema"]["schema"] == SCHEMA
    lines = read_jsonl(str(tmp_path / "resp" / LINES))
    assert lines[0]["echo"]["text"]["format"]["name"] == "a" and lines[1]["echo"] == {"metadata": {"k": "v"}}
    refused = read_jsonl(str(tmp_path / "resp" / REJECTED))
    assert refused[0]["line"] == 3 and refused[0]["param"] == "tools"


def test_one_text_per_distinct_schema() -> None:
    texts = SchemaTexts(limit=2)
    first = texts.text(SCHEMA)
    reordered = json.loads(json.dumps(dict(reversed(list(SCHEMA.items())))))
    assert json.dumps(reordered) != first and schema_key(reordered) == schema_key(SCHEMA)
    assert texts.text(reordered) is first and len(texts) == 1  # the same grammar: xgrammar's cache hits
    other = texts.text({"type": "string"})
    assert other != first and len(texts) == 2
    texts.text({"type": "integer"})  # over the limit: the least recently used goes
    assert len(texts) == 2 and texts.text(SCHEMA) is not first


def test_embed_counts_tokens_only_when_asked() -> None:
    embed = BUILTIN_TASKS["embed"]
    assert embed.check_options({})["count_tokens"] is False
    assert embed.check_options({"count_tokens": True})["count_tokens"] is True
    with pytest.raises(InputError, match="count_tokens"):
        embed.check_options({"count_tokens": 1})


def test_a_batch_takes_a_bounded_number_of_distinct_schemas(tmp_path: Path) -> None:
    """Each distinct schema is a grammar every worker compiles: past the setting a line is its own 400, while
    the same schema again (its keys in another order) costs nothing more."""
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "boolean"}}} for i in range(3)]
    reordered = {"properties": {"k0": {"type": "boolean"}}, "type": "object"}
    bodies = [{"model": "m", "input": "q", "text": {"format": {"type": "json_schema", "name": "a", "schema": s}}}
              for s in (*schemas, reordered)]
    checked = check_generation(io.BytesIO(_batch(bodies, "/v1/responses")), str(tmp_path), "/v1/responses", 100,
                               1000, max_schemas=2)
    assert (checked.errors, checked.rows, checked.rejected) == ([], 3, 1)
    refused = read_jsonl(str(tmp_path / REJECTED))
    assert [r["custom_id"] for r in refused] == ["c2"] and refused[0]["param"] == "response_format"
    assert "BITINGLIP_BATCH_MAX_SCHEMAS" in refused[0]["message"] and "3th" not in refused[0]["message"]
