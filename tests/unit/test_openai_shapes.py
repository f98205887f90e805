"""The OpenAI conversions without a gateway: bodies to rows of the generation
row contract, output rows to chat.completion / text_completion bodies and
stream chunks (that the official client's types take), embeddings' base64 and dimensions, and a batch file's check."""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bitinglip.errors import InputError
from bitinglip.gateway.openai.batchfile import INPUT, LINES, REJECTED, check_embeddings, read_jsonl
from bitinglip.gateway.openai.bodies import EmbeddingRequest
from bitinglip.gateway.openai.chunks import Chunks
from bitinglip.gateway.openai.shapes import (
    chat_body,
    completion_body,
    embedding_body,
    generation_row,
    shape_vector,
)
from bitinglip.gateway.openapi import document


def test_a_chat_body_becomes_a_row_with_messages_and_params() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                                    {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 12, "temperature": 0.5, "stop": "END", "logprobs": True, "top_logprobs": 3,
            "seed": 7, "n": 2, "response_format": {"type": "json_object"}}
    row = generation_row("/v1/chat/completions", body, "req-1", 1000)
    assert row == {"id": "req-1", "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hi there"}],
                   "params": {"max_tokens": 12, "temperature": 0.5, "stop": ["END"], "logprobs": 3, "seed": 7,
                              "n": 2, "response_format": {"type": "json_object"}}}


def test_a_completion_body_becomes_a_row_with_text() -> None:
    row = generation_row("/v1/completions", {"model": "m", "prompt": ["once upon"], "max_tokens": 5, "top_k": 4,
                                             "logprobs": 2}, 9, 1000)
    assert row == {"id": 9, "text": "once upon", "params": {"max_tokens": 5, "top_k": 4, "logprobs": 2}}


@pytest.mark.parametrize(("endpoint", "body", "param"), [
    ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": {}, "content": "x"}]}, "messages"),  # unhashable
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "colour": 1}, "colour"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
    ("/v1/completions", {"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": "m", "prompt": "x" * 11}, "prompt"),
])
def test_bad_generation_bodies_name_their_field(endpoint: str, body: dict, param: str) -> None:
    with pytest.raises(InputError) as caught:
        generation_row(endpoint, body, "r", 10)
    assert caught.value.param == param  # type: ignore[attr-defined]


def test_an_output_row_becomes_a_chat_completion_and_its_chunks() -> None:
    out = {"id": "r", "text": ["yes", "no"], "finish_reason": ["stop", "length"], "prompt_tokens": 9,
           "completion_tokens": 4}
    body = chat_body("m", out, created=100)
    assert body["object"] == "chat.completion" and body["created"] == 100 and body["id"].startswith("chatcmpl-")
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "yes", "stop"), (1, "no", "length")]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def test_streamed_chunks_add_up_to_the_answer_and_parse_as_the_clients_types() -> None:
    chat_chunk = pytest.importorskip("openai.types.chat").ChatCompletionChunk
    completion = pytest.importorskip("openai.types").Completion
    body = chat_body("m", {"text": ["yes it is", "no"], "finish_reason": ["stop", "length"], "prompt_tokens": 9,
                           "completion_tokens": 4})
    chunks = Chunks("/v1/chat/completions", "m", include_usage=True)
    # choice 0 streamed in part, choice 1 not at all: the closing chunks carry the rest of each
    stream = chunks.opening(2) + [chunks.text(0, "yes"), chunks.text(0, " it")] + chunks.closing(body)
    parsed = [chat_chunk.model_validate(c) for c in stream]  # the official client's own type, validated
    assert {c.object for c in parsed} == {"chat.completion.chunk"} and len({c.id for c in parsed}) == 1
    texts = {i: "".join(c.choices[0].delta.content or "" for c in parsed if c.choices and c.choices[0].index == i)
             for i in (0, 1)}
    assert texts == {0: "yes it is", 1: "no"}
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].usage is None
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in parsed if c.choices and
                c.choices[0].finish_reason]
    assert finishes == [(0, "stop"), (1, "length")]
    assert parsed[-1].choices == [] and parsed[-1].usage.total_tokens == 13  # include_usage: the last chunk
    # without include_usage no chunk has a usage field (OpenAI's own stream has none)
    plain = Chunks("/v1/completions", "m", include_usage=False)
    done = completion_body("m", {"text": "the end", "finish_reason": "length", "prompt_tokens": 3,
                                 "completion_tokens": 2})
    stream = [plain.text(0, "the")] + plain.closing(done)
    assert all("usage" not in c for c in stream)
    # OpenAI streams null finish reasons before the last, which its client reads without validating
    parsed_text = [completion.model_construct(**c) for c in stream[:-1]] + [completion.model_validate(stream[-1])]
    assert "".join(c["choices"][0]["text"] for c in stream) == "the end"
    assert parsed_text[-1].choices[0].finish_reason == "length" and {c.object for c in parsed_text} == {
        "text_completion"}


def test_a_single_output_row_becomes_a_text_completion() -> None:
    body = completion_body("m", {"text": "the end", "finish_reason": "length", "prompt_tokens": 3,
                                 "completion_tokens": 2}, created=5)
    assert body["object"] == "text_completion" and body["choices"] == [
        {"index": 0, "text": "the end", "finish_reason": "length", "logprobs": None}]
    assert body["usage"]["total_tokens"] == 5


def test_base64_is_little_endian_float32_and_dimensions_renormalise() -> None:
    vector = [3.0, 4.0, 12.0]
    packed = shape_vector(vector, "base64", None)
    assert struct.unpack("<3f", base64.b64decode(packed)) == (3.0, 4.0, 12.0)
    cut = shape_vector(vector, "float", 2)
    assert cut == [0.6, 0.8] and math.isclose(math.hypot(*cut), 1.0)
    with pytest.raises(InputError):
        shape_vector(vector, "float", 4)
    body = embedding_body("m", [vector], "float", None, 7)
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and body["data"][0]["index"] == 0
    assert embedding_body("m", [vector], "float", None, None)["usage"] is None  # unknown, not zero


def test_the_documented_embeddings_body_is_the_one_checked() -> None:
    assert set(document()["components"]["schemas"]["EmbeddingRequest"]["properties"]) == set(
        EmbeddingRequest.model_fields)


def test_a_batch_file_check_keeps_every_line_once(tmp_path: Path) -> None:
    def line(cid: str, body: object) -> str:
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": body})

    text = "\n".join([line("a", {"model": "m", "input": "x"}), line("b", {"model": "m", "input": ["p", "q"]}),
                      line("c", {"model": "m", "input": 3}), line("d", {"model": "m", "input": "y", "dimensions": 4})])
    checked = check_embeddings(io.BytesIO(text.encode()), str(tmp_path), "/v1/embeddings", 100, 1000)
    assert (checked.errors, checked.model, checked.lines, checked.rows, checked.rejected) == ([], "m", 4, 4, 1)
    table = pq.read_table(tmp_path / INPUT).to_pydict()
    assert table == {"id": ["a", "b", "b", "d"], "text": ["x", "p", "q", "y"]}
    assert [(x["custom_id"], x["count"], x["dims"]) for x in read_jsonl(str(tmp_path / LINES))] == [
        ("a", 1, None), ("b", 2, None), ("d", 1, 4)]
    assert [(x["custom_id"], x["line"], x["param"]) for x in read_jsonl(str(tmp_path / REJECTED))] == [("c", 3, "input")]


def test_a_file_over_the_line_limit_fails_at_the_first_line_past_it(tmp_path: Path) -> None:
    text = "\n".join(json.dumps({"custom_id": f"r{i}", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}})
                     for i in range(5))
    checked = check_embeddings(io.BytesIO(text.encode()), str(tmp_path), "/v1/embeddings", 3, 1000)
    assert [(e["code"], e["line"]) for e in checked.errors] == [("too_many_lines", 4)]


@pytest.mark.parametrize(("body", "param", "words"), [
    # the field's path as the body writes it, and what is wrong with it (issue 22)
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "wizard", "content": "c"}]}, "messages", "messages[2].role must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages",
     "messages[0].content[0].type must be 'text'"),
    ({"stop": ["ok", 1]}, "stop", "stop[1] must be a string"),
    ({"temperature": 2.5}, "temperature", "temperature=2.5: expected at most 2"),
    # a value as JSON wrote it: a quoted number is not a number, true is not 1
    ({"temperature": "0.5"}, "temperature", "temperature must be a number, got a string"),
    ({"n": True}, "n", "n must be a whole number, got a boolean"),
    ({"stream": "yes"}, "stream", "stream must be true or false"),
])
def test_a_refused_chat_body_names_the_fields_path(body: dict, param: str, words: str) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(InputError) as caught:
        generation_row("/v1/chat/completions", chat, "r", 1000)
    assert caught.value.param == param and words in str(caught.value), str(caught.value)  # type: ignore[attr-defined]


def test_an_answer_sent_back_as_a_message_is_taken() -> None:
    """openai-python sends an answer's message back with the fields it came with (refusal, tool_calls, ...)."""
    answer = {"role": "assistant", "content": "hi", "refusal": None, "tool_calls": None, "annotations": []}
    row = generation_row("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "hello"}, answer, {"role": "user", "content": "again"}]}, "r", 1000)
    assert row["messages"][1] == {"role": "assistant", "content": "hi"}


def test_a_batch_lines_envelope_is_checked_field_by_field(tmp_path: Path) -> None:
    body = {"model": "m", "input": "x"}
    lines = [{"custom_id": "a", "url": "/v1/embeddings", "body": body},
             {"url": "/v1/embeddings", "body": body},
             {"custom_id": "c", "method": "GET", "url": "/v1/embeddings", "body": body},
             {"custom_id": "d", "url": "/v1/embeddings", "body": "x"},
             {"custom_id": "e", "url": "/v1/embeddings", "body": body, "colour": "red"}]
    text = "\n".join(json.dumps(line) for line in lines)
    checked = check_embeddings(io.BytesIO(text.encode()), str(tmp_path), "/v1/embeddings", 100, 1000)
    assert [(e["code"], e["line"], e["param"]) for e in checked.errors] == [
        ("missing_custom_id", 2, "custom_id"), ("invalid_method", 3, "method"), ("invalid_request", 4, "body"),
        ("invalid_request", 5, "colour")]
    assert all(e["message"].startswith(f"line {e['line']}: ") for e in checked.errors)
    assert checked.rows == 1


def test_a_lone_surrogate_is_named_as_one(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"messages\[0\]\.content is not valid Unicode \(a lone surrogate\)"):
        generation_row("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a\ud800"}]},
                       "r", 1000)
    text = json.dumps({"custom_id": "\ud800", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}})
    checked = check_embeddings(io.BytesIO(text.encode()), str(tmp_path), "/v1/embeddings", 100, 1000)
    assert [(e["code"], e["line"]) for e in checked.errors] == [("invalid_custom_id", 1)]
