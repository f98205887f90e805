"""The OpenAI-compatible API, driven by the official ``openai`` client against
the live gateway (real Redis, real Dask cluster): Files, Batches, embeddings,
models.list and the error classes.  Batch outputs are compared line by line
(by custom_id) with the Python client's results for the same rows."""

from __future__ import annotations

import base64
import json
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import redis
from gwtools import auth, make_token, new_user

from bitinglip import redis_keys as keys

openai = pytest.importorskip("openai", reason="the official openai client is not installed (the dev extra pins it)")

MODEL = "tiny-encoder"
#: how long a batch may take here (2 shared cores); a deadline, not a measurement
BATCH_DEADLINE_S = 300


def client(gateway: str, sub: str) -> Any:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=make_token(sub), max_retries=0, timeout=120)


def line(custom_id: str, body: dict[str, Any], url: str = "/v1/embeddings") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def upload(oai: Any, lines: list[str], name: str = "batch.jsonl") -> Any:
    return oai.files.create(file=(name, ("\n".join(lines) + "\n").encode()), purpose="batch")


def finished(oai: Any, batch_id: str) -> Any:
    deadline = time.time() + BATCH_DEADLINE_S
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        if time.time() > deadline:
            pytest.fail(f"batch still {batch.status} after {BATCH_DEADLINE_S}s: {batch}")
        time.sleep(0.3)


def jsonl(oai: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in oai.files.content(file_id).text.splitlines() if x.strip()]


def by_custom_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a custom_id appears more than once"
    return {r["custom_id"]: r for r in rows}


def expected(platform: Any, texts: list[str]) -> np.ndarray:
    frame = platform.submit("embed", model=MODEL, inputs=pd.DataFrame({"id": range(len(texts)), "text": texts}))
    result = frame.result().sort_values("id")
    return np.stack(result["embedding"].to_numpy())


def decode64(value: str) -> np.ndarray:
    raw = base64.b64decode(value)
    return np.array(struct.unpack(f"<{len(raw) // 4}f", raw))


# --- models, online embeddings, errors


def test_models_list_is_openais_and_bitinglips_listing_stays(gateway: str, models: dict[str, str]) -> None:
    oai = client(gateway, new_user("oai-models"))
    listed = {m.id: m for m in oai.models.list()}
    assert MODEL in listed and "all-MiniLM-L6-v2" in listed
    assert listed[MODEL].object == "model" and listed[MODEL].created > 0 and listed[MODEL].owned_by == "bitinglip"
    assert oai.models.retrieve(MODEL).id == MODEL
    own = httpx.get(f"{gateway}/v1/models?format=bitinglip", headers=auth(new_user("oai-models")), timeout=30).json()
    assert {m["name"]: m for m in own["models"]}[MODEL]["source"] == "registered"


def test_embeddings_float_base64_and_dimensions(gateway: str, models: dict[str, str], platform: Any) -> None:
    oai = client(gateway, new_user("oai-embed"))
    texts = ["the cat sat", "on the mat", "a third text"]
    want = expected(platform, texts)
    floats = oai.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    got = np.array([d.embedding for d in floats.data])
    assert [d.index for d in floats.data] == [0, 1, 2]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(texts)
    raw = httpx.post(f"{gateway}/v1/embeddings", headers=auth(new_user("oai-embed")), timeout=60,
                     json={"model": MODEL, "input": texts[0], "encoding_format": "base64"}).json()
    np.testing.assert_allclose(decode64(raw["data"][0]["embedding"]), want[0], atol=1e-5)
    default = oai.embeddings.create(model=MODEL, input=texts[0])  # the client asks for base64 and decodes it
    np.testing.assert_allclose(default.data[0].embedding, want[0], atol=1e-5)
    cut = oai.embeddings.create(model=MODEL, input=texts, dimensions=8, encoding_format="float")
    short = np.array([d.embedding for d in cut.data])
    prefix = want[:, :8] / np.linalg.norm(want[:, :8], axis=1, keepdims=True)
    assert short.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(short, prefix, atol=1e-5)


def test_errors_come_out_as_the_clients_classes(gateway: str, models: dict[str, str]) -> None:
    bad_key = openai.OpenAI(base_url=f"{gateway}/v1", api_key="not-a-jwt", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad_key.models.list()
    assert caught.value.body["type"] == "authentication_error" and caught.value.request_id
    oai = client(gateway, new_user("oai-errors"))
    with pytest.raises(openai.BadRequestError) as caught:
        oai.embeddings.create(model=MODEL, input=[], encoding_format="float")
    assert caught.value.param == "input" and caught.value.code == "invalid_input"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.embeddings.create(model=MODEL, input="x", dimensions=10_000, encoding_format="float")
    assert caught.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve("file-" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_" + "0" * 32)
    # a batch is a submission: the 11th in a minute is refused (10/minute), 404s count as 400s do not
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(11):
            with pytest.raises(openai.NotFoundError):
                oai.batches.create(input_file_id="file-" + "1" * 32, endpoint="/v1/embeddings",
                                   completion_window="24h")
    assert caught.value.body["type"] == "rate_limit_error"


# --- batches


def test_batch_end_to_end_matches_the_python_client(gateway: str, models: dict[str, str], platform: Any,
                                                    redis_url: str) -> None:
    sub = new_user("oai-batch")
    oai = client(gateway, sub)
    texts = [f"row {i}: the quick brown fox {i % 7}" for i in range(30)]
    lines = [line(f"req-{i}", {"model": MODEL, "input": t, "encoding_format": "float"}) for i, t in enumerate(texts)]
    lines.append(line("several", {"model": MODEL, "input": texts[:3], "encoding_format": "float"}))
    lines.append(line("cut", {"model": MODEL, "input": texts[4], "dimensions": 8, "encoding_format": "float"}))
    lines.append(line("packed", {"model": MODEL, "input": texts[5], "encoding_format": "base64"}))
    lines.append(line("bad-body", {"model": MODEL, "input": 42}))
    uploaded = upload(oai, lines)
    assert uploaded.purpose == "batch" and uploaded.bytes == len(("\n".join(lines) + "\n").encode())
    assert oai.files.retrieve(uploaded.id).filename == "batch.jsonl"
    batch = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                               metadata={"idempotency_key": f"e2e-{sub}", "team": "a"})
    assert batch.status in ("in_progress", "finalizing", "completed") and batch.request_counts.total == len(lines)
    again = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                               metadata={"idempotency_key": f"e2e-{sub}", "team": "a"})
    assert again.id == batch.id  # the same key does not run the file twice
    done = finished(oai, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (34, 33, 1)
    assert done.completed_at and done.metadata == {"idempotency_key": f"e2e-{sub}", "team": "a"}
    out, err = by_custom_id(jsonl(oai, done.output_file_id)), by_custom_id(jsonl(oai, done.error_file_id))
    assert set(out) | set(err) == {json.loads(x)["custom_id"] for x in lines} and not set(out) & set(err)
    want = expected(platform, texts)
    for i in range(30):
        response = out[f"req-{i}"]["response"]
        assert response["status_code"] == 200 and response["body"]["model"] == MODEL
        np.testing.assert_allclose(response["body"]["data"][0]["embedding"], want[i], atol=1e-5)
    several = out["several"]["response"]["body"]["data"]
    assert [d["index"] for d in several] == [0, 1, 2]
    np.testing.assert_allclose([d["embedding"] for d in several], want[:3], atol=1e-5)
    cut = np.array(out["cut"]["response"]["body"]["data"][0]["embedding"])
    np.testing.assert_allclose(cut, want[4, :8] / np.linalg.norm(want[4, :8]), atol=1e-5)
    np.testing.assert_allclose(decode64(out["packed"]["response"]["body"]["data"][0]["embedding"]), want[5],
                               atol=1e-5)
    # usage: the tokens the model read, as the online endpoint counts them for the same texts
    for custom_id, inputs in (("req-0", texts[0]), ("several", texts[:3])):
        online = oai.embeddings.create(model=MODEL, input=inputs, encoding_format="float").usage
        assert out[custom_id]["response"]["body"]["usage"] == {"prompt_tokens": online.prompt_tokens,
                                                               "total_tokens": online.prompt_tokens}
    assert online.prompt_tokens > 3
    assert done.usage.input_tokens == sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in out.values())
    assert done.usage.output_tokens == 0 and done.usage.total_tokens == done.usage.input_tokens
    refused = err["bad-body"]["response"]
    assert refused["status_code"] == 400 and "line 34" in refused["body"]["error"]["message"]
    assert refused["body"]["error"]["param"] == "input"
    assert batch.id in [b.id for b in oai.batches.list()]
    assert done.output_file_id in [f.id for f in oai.files.list(purpose="batch_output")]
    # Redis loses the batch's and the output file's records: both are read back from beside their bytes
    lost = redis.Redis.from_url(redis_url)
    lost.delete(keys.openai_batch(batch.id.removeprefix("batch_")), keys.openai_file(done.output_file_id))
    assert oai.batches.retrieve(batch.id).output_file_id == done.output_file_id
    assert len(jsonl(oai, done.output_file_id)) == 33
    # another subject sees none of it
    other = client(gateway, new_user("oai-other"))
    for call in (lambda: other.batches.retrieve(batch.id), lambda: other.files.retrieve(uploaded.id),
                 lambda: other.files.content(done.output_file_id), lambda: other.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in other.batches.list()]
    assert uploaded.id not in [f.id for f in other.files.list()]
    assert oai.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(uploaded.id)


def test_a_file_that_cannot_run_fails_the_batch_naming_its_lines(gateway: str, models: dict[str, str]) -> None:
    oai = client(gateway, new_user("oai-invalid"))
    lines = [line("a", {"model": MODEL, "input": "x"}), "{not json", line("b", {"model": MODEL, "input": "y"}),
             line("a", {"model": MODEL, "input": "z"}), line("c", {"model": MODEL, "input": "w"}, url="/v1/moderations"),
             line("d", {"model": "all-MiniLM-L6-v2", "input": "v"})]
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/embeddings",
                               completion_window="24h")
    assert batch.status == "failed" and batch.failed_at
    found = {e.line: e.code for e in batch.errors.data}
    assert found == {2: "invalid_json_line", 4: "duplicate_custom_id", 5: "invalid_url", 6: "mixed_models"}
    assert all(f"line {e.line}" in e.message for e in batch.errors.data)
    assert oai.batches.retrieve(batch.id).status == "failed"


def test_a_batch_whose_every_line_is_refused_completes_with_only_errors(gateway: str, models: dict[str, str]) -> None:
    oai = client(gateway, new_user("oai-all-bad"))
    lines = [line(f"bad{i}", {"model": MODEL, "input": i}) for i in range(3)]
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/embeddings",
                               completion_window="24h")
    assert batch.status == "completed" and batch.request_counts.failed == 3  # nothing to run: ended at once
    assert sorted(by_custom_id(jsonl(oai, batch.error_file_id))) == ["bad0", "bad1", "bad2"]
    assert jsonl(oai, batch.output_file_id) == []


def test_cancel_keeps_what_finished_and_every_line_once(gateway: str, models: dict[str, str]) -> None:
    oai = client(gateway, new_user("oai-cancel"))
    n = 6000
    lines = [line(f"c{i}", {"model": MODEL, "input": f"cancel me {i} " + "word " * 40}) for i in range(n)]
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/embeddings",
                               completion_window="24h")
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    done = finished(oai, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    out, err = by_custom_id(jsonl(oai, done.output_file_id)), by_custom_id(jsonl(oai, done.error_file_id))
    assert not set(out) & set(err) and len(out) + len(err) == n
    assert (done.request_counts.completed, done.request_counts.failed) == (len(out), len(err))
    assert all(e["error"]["code"] == "batch_cancelled" for e in err.values())
    assert err, "the cancel landed after every line had run"
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(batch.id)


def test_ten_thousand_lines_with_one_percent_bad(gateway: str, models: dict[str, str], tmp_path: Path) -> None:
    oai = client(gateway, new_user("oai-10k"))
    bad_bodies = [{"model": MODEL, "input": 7}, {"model": MODEL, "input": []}, {"model": MODEL, "input": "a\ud800b"},
                  {"model": MODEL, "input": "x", "colour": "red"}, {"model": MODEL, "input": "x", "dimensions": 0}]
    lines, bad = [], set()
    for i in range(10_000):
        if i % 100 == 37:
            bad.add(f"r{i}")
            lines.append(line(f"r{i}", bad_bodies[(i // 100) % len(bad_bodies)]))
        else:
            lines.append(line(f"r{i}", {"model": MODEL, "input": f"line {i} of ten thousand"}))
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/embeddings",
                               completion_window="24h")
    done = finished(oai, batch.id)
    assert done.status == "completed", done
    out, err = by_custom_id(jsonl(oai, done.output_file_id)), by_custom_id(jsonl(oai, done.error_file_id))
    assert set(err) == bad and len(bad) == 100
    assert set(out) == {f"r{i}" for i in range(10_000)} - bad
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (10_000, 9900, 100)
    assert all(r["response"]["status_code"] == 400 for r in err.values())


def test_upload_limits_and_another_gateway_finishes_a_batch(gateway: str, gw_settings: Any,
                                                            models: dict[str, str]) -> None:
    from gwtools import serve

    sub = new_user("oai-limits")
    first = client(gateway, sub)
    lines = [line(f"x{i}", {"model": MODEL, "input": f"text {i}"}) for i in range(40)]
    batch = first.batches.create(input_file_id=upload(first, lines).id, endpoint="/v1/embeddings",
                                 completion_window="24h")
    small = gw_settings.with_(batch_max_lines=3, batch_max_bytes=10_000)
    with serve(small) as url:
        oai = client(url, sub)
        # a batch lives in Redis and the results folder: any gateway follows it to its end and writes its files
        done = finished(oai, batch.id)
        assert done.status == "completed" and len(jsonl(oai, done.output_file_id)) == 40
        with pytest.raises(openai.APIStatusError) as caught:
            upload(oai, [line(f"x{i}", {"model": MODEL, "input": "x"}) for i in range(4)])
        assert caught.value.status_code == 413 and "BITINGLIP_BATCH_MAX_LINES" in caught.value.message
        with pytest.raises(openai.APIStatusError) as caught:
            upload(oai, [line("big", {"model": MODEL, "input": "x" * 20_000})])
        assert caught.value.status_code == 413
        assert upload(oai, [line(f"x{i}", {"model": MODEL, "input": "x"}) for i in range(3)]).bytes > 0


# --- chat and text completions (the generate task's engine, issue 16)


def register_chat_model(gateway: str, admin: dict[str, str], folder: Path, name: str) -> str:
    """A random-weight Llama with a chat template, built in ``folder`` and registered as ``name`` for generate."""
    from tiny_models import make_tiny_llama

    path = make_tiny_llama(folder)
    r = httpx.post(f"{gateway}/admin/models", headers=admin, timeout=120,
                   json={"name": name, "source": str(path), "task": "generate"})
    assert r.status_code in (200, 201), r.text
    return name


@pytest.fixture(scope="module")
def tiny_llama(gateway: str, admin: dict[str, str], models_dir: Path) -> str:
    return register_chat_model(gateway, admin, models_dir / "tiny-llama-openai", "tiny-llama")


def test_chat_and_text_completions_with_and_without_stream(gateway: str, tiny_llama: str) -> None:
    oai = client(gateway, new_user("oai-chat"))
    messages = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "hello there"}]
    chat = oai.chat.completions.create(model=tiny_llama, messages=messages, max_tokens=6, temperature=0, seed=3)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert 0 < chat.usage.completion_tokens <= 6 and chat.usage.prompt_tokens > 0
    streamed = list(oai.chat.completions.create(model=tiny_llama, messages=messages, max_tokens=6, temperature=0,
                                                seed=3, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == choice.message.content  # greedy: the same answer, streamed
    assert streamed[-1].usage.total_tokens == chat.usage.total_tokens
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == choice.finish_reason
    two = oai.chat.completions.create(model=tiny_llama, messages=messages, max_tokens=4, n=2, temperature=1.0, seed=5)
    assert [c.index for c in two.choices] == [0, 1]
    text_completion = oai.completions.create(model=tiny_llama, prompt="once upon a time", max_tokens=5,
                                             temperature=0)
    assert text_completion.object == "text_completion" and 0 < text_completion.usage.completion_tokens <= 5
    chunks = list(oai.completions.create(model=tiny_llama, prompt="once upon a time", max_tokens=5, temperature=0,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text_completion.choices[0].text
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=tiny_llama, messages=messages, temperature=-1)
    assert "temperature" in caught.value.message


def test_a_stream_comes_in_pieces_as_the_engine_produces_them(gateway: str, tiny_llama: str) -> None:
    oai = client(gateway, new_user("oai-stream"))
    ask = {"model": tiny_llama, "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 40,
           "temperature": 0}
    whole = oai.chat.completions.create(**ask)
    arrivals = [(time.monotonic(), chunk) for chunk in oai.chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True})]
    chunks = [chunk for _, chunk in arrivals]
    pieces = [(at, c.choices[0].delta.content) for at, c in arrivals if c.choices and c.choices[0].delta.content]
    # the greedy answer, in many pieces (it came as one piece while the engine handed back whole rows)
    assert "".join(text for _, text in pieces) == whole.choices[0].message.content
    assert len(pieces) >= 10, [text for _, text in pieces]
    assert pieces[0][0] < arrivals[-1][0]  # the first piece came before the end
    assert chunks[0].choices[0].delta.role == "assistant" and len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    # include_usage: a last chunk with no choices and the usage; null on every other one
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    # n > 1: each choice's pieces add up to its text (a seed makes the sampled answer the same)
    sampled = {**ask, "n": 2, "temperature": 0.8, "seed": 11, "max_tokens": 12}
    two = {c.index: c.message.content for c in oai.chat.completions.create(**sampled).choices}
    apart: dict[int, str] = {0: "", 1: ""}
    for c in oai.chat.completions.create(**sampled, stream=True):
        apart[c.choices[0].index] += c.choices[0].delta.content or ""
    assert apart == two
    # text completions stream the same way
    prompt = {"model": tiny_llama, "prompt": "once upon a time", "max_tokens": 30, "temperature": 0}
    text = oai.completions.create(**prompt).choices[0].text
    streamed = [c.choices[0].text for c in oai.completions.create(**prompt, stream=True) if c.choices]
    assert "".join(streamed) == text and len([t for t in streamed if t]) >= 8, streamed


def _engines(platform: Any) -> dict[str, float]:
    """The requests in the workers' generation engines and the tokens they generated so far, over all workers."""

    def probe(dask_worker: Any) -> dict[str, float]:
        entries = dask_worker.plugins["bitinglip-models"].residency.entries()
        stats = [e.loaded.info["engine"].stats() for e in entries
                 if e.loaded is not None and e.loaded.info.get("engine") is not None]
        return {k: sum(s.get(k, 0.0) for s in stats) for k in ("running", "generated_tokens")}

    figures = platform.client.run(probe).values()
    return {k: sum(f[k] for f in figures) for k in ("running", "generated_tokens")}


def test_a_client_that_stops_reading_a_stream_aborts_its_engine_request(gateway: str, tiny_llama: str,
                                                                        platform: Any) -> None:
    oai = client(gateway, new_user("oai-stream-gone"))
    n, max_tokens = 8, 480
    before = _engines(platform)
    stream = oai.chat.completions.create(model=tiny_llama, messages=[{"role": "user", "content": "go on and on"}],
                                         max_tokens=max_tokens, n=n, temperature=1.0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # reading, then no more
    stream.close()
    deadline = time.monotonic() + 60
    while _engines(platform)["running"]:
        assert time.monotonic() < deadline, "the engines still run the stream's request a minute after it was left"
        time.sleep(0.2)
    generated = _engines(platform)["generated_tokens"] - before["generated_tokens"]
    assert 0 < generated < n * max_tokens / 2, f"{generated:g} of {n * max_tokens} tokens generated"
    # the worker serves on
    again = oai.chat.completions.create(model=tiny_llama, messages=[{"role": "user", "content": "still there?"}],
                                        max_tokens=3, stream=True)
    assert [c.choices[0].finish_reason for c in again if c.choices][-1] in ("stop", "length")


def test_a_chat_batch_matches_the_python_client(gateway: str, tiny_llama: str, platform: Any) -> None:
    oai = client(gateway, new_user("oai-chat-batch"))
    chats = [[{"role": "user", "content": f"question number {i}"}] for i in range(6)]
    bodies = [{"model": tiny_llama, "messages": chat, "max_tokens": 3 + i, "temperature": 0} for i, chat in enumerate(chats)]
    bodies[2]["stop"] = "zz"
    bodies[3] = {**bodies[3], "n": 2, "temperature": 0.8, "seed": 11}
    lines = [line(f"chat-{i}", body, url="/v1/chat/completions") for i, body in enumerate(bodies)]
    lines.append(line("too-hot", {"model": tiny_llama, "messages": chats[0], "temperature": -1},
                      url="/v1/chat/completions"))
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    done = finished(oai, batch.id)
    assert done.status == "completed", done
    out, err = by_custom_id(jsonl(oai, done.output_file_id)), by_custom_id(jsonl(oai, done.error_file_id))
    assert set(out) == {f"chat-{i}" for i in range(6)} and set(err) == {"too-hot"}
    assert "temperature" in err["too-hot"]["response"]["body"]["error"]["message"]
    frame = pd.DataFrame({"id": [f"chat-{i}" for i in range(6)], "messages": chats,
                          "params": [{"n": 1, **{k: v for k, v in b.items() if k not in ("model", "messages")}}
                                     for b in bodies]})
    frame.loc[2, "params"]["stop"] = ["zz"]
    want = platform.submit("generate", model=tiny_llama, inputs=frame, options={"n": 2}).result().set_index("id")
    for i in range(6):
        body = out[f"chat-{i}"]["response"]["body"]
        choices = 2 if i == 3 else 1  # usage counts the tokens of every choice, as OpenAI's does
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= (3 + i) * choices
        texts = [c["message"]["content"] for c in body["choices"]]
        if i == 3:
            assert len(texts) == 2
        else:  # greedy: the very text the Python client generates for the row
            assert texts == list(want.loc[f"chat-{i}", "text"]), i


# --- the Responses API and json_schema lines (issue 23)

#: bounded output: a random-weight model under this grammar ends well inside 64 tokens
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "word": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["ok", "word"], "additionalProperties": False}


def test_online_responses_are_the_chat_answer_and_keep_to_a_schema(gateway: str, tiny_llama: str) -> None:
    import jsonschema

    oai = client(gateway, new_user("oai-responses"))
    chat = oai.chat.completions.create(model=tiny_llama, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    got = oai.responses.create(model=tiny_llama, instructions="be brief", input="hello there", max_output_tokens=6,
                               temperature=0, metadata={"k": "v"})
    assert got.object == "response" and got.id.startswith("resp_")
    assert got.output_text == chat.choices[0].message.content  # greedy: the chat path's very answer
    assert (got.usage.input_tokens, got.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                 chat.usage.completion_tokens)
    assert (got.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    assert got.metadata == {"k": "v"} and got.instructions == "be brief"
    shaped = oai.responses.create(model=tiny_llama, input=[{"role": "user", "content": "json please"}],
                                  max_output_tokens=64, temperature=0,
                                  text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}})
    assert shaped.status == "completed", shaped
    jsonschema.validate(json.loads(shaped.output_text), SCHEMA)
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=tiny_llama, input="x", tools=[{"type": "web_search"}])
    assert caught.value.param == "tools"


def test_responses_and_json_schema_batches_complete(gateway: str, tiny_llama: str) -> None:
    import jsonschema

    oai = client(gateway, new_user("oai-responses-batch"))
    with pytest.raises(openai.BadRequestError) as caught:  # OpenAI's metadata limits, naming what is over
        oai.batches.create(input_file_id="file-x", endpoint="/v1/responses", completion_window="24h",
                           metadata={"k" * 65: "v"})
    assert caught.value.param == "metadata" and "65 characters" in caught.value.message
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}
    lines = [
        line("plain", {"model": tiny_llama, "instructions": "be brief", "input": "hello there",
                       "max_output_tokens": 6, "temperature": 0}, url="/v1/responses"),
        line("listed", {"model": tiny_llama, "max_output_tokens": 4, "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "question 2"}]}]},
             url="/v1/responses"),
        line("shaped", {"model": tiny_llama, "input": "json please", "max_output_tokens": 64, "text": fmt,
                        "metadata": {"k": "v"}}, url="/v1/responses"),
        line("tools", {"model": tiny_llama, "input": "x", "tools": [{"type": "web_search"}]}, url="/v1/responses"),
    ]
    responses = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/responses",
                                   completion_window="24h")
    reordered = json.loads(json.dumps(dict(reversed(list(SCHEMA.items())))))  # the same schema to the engine
    chat_lines = [line(f"schema-{i}", {"model": tiny_llama, "messages": [{"role": "user", "content": f"json {i}"}],
                                       "max_tokens": 64, "temperature": 0, "response_format": {
                                           "type": "json_schema", "json_schema": {"name": "answer", "schema": s}}},
                       url="/v1/chat/completions") for i, s in enumerate((SCHEMA, reordered, SCHEMA))]
    chats = oai.batches.create(input_file_id=upload(oai, chat_lines).id, endpoint="/v1/chat/completions",
                               completion_window="24h")

    done = finished(oai, responses.id)
    assert done.status == "completed" and done.endpoint == "/v1/responses", done
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    out, err = by_custom_id(jsonl(oai, done.output_file_id)), by_custom_id(jsonl(oai, done.error_file_id))
    parsed = {k: openai.types.responses.Response.model_validate(v["response"]["body"]) for k, v in out.items()}
    online = oai.chat.completions.create(model=tiny_llama, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    assert parsed["plain"].output_text == online.choices[0].message.content
    assert parsed["plain"].usage.input_tokens == online.usage.prompt_tokens and parsed["plain"].instructions
    assert 0 < parsed["listed"].usage.output_tokens <= 4
    assert parsed["shaped"].status == "completed" and parsed["shaped"].metadata == {"k": "v"}
    jsonschema.validate(json.loads(parsed["shaped"].output_text), SCHEMA)
    assert (done.usage.input_tokens, done.usage.output_tokens) == (
        sum(p.usage.input_tokens for p in parsed.values()), sum(p.usage.output_tokens for p in parsed.values()))
    refused = err["tools"]["response"]["body"]["error"]
    assert refused["param"] == "tools" and "line 4" in refused["message"]

    done = finished(oai, chats.id)
    assert done.status == "completed" and done.request_counts.completed == 3, done
    for row in jsonl(oai, done.output_file_id):
        jsonschema.validate(json.loads(row["response"]["body"]["choices"][0]["message"]["content"]), SCHEMA)


def test_a_resubmitted_batch_counts_its_reused_requests(gateway: str, models: dict[str, str]) -> None:
    oai = client(gateway, new_user("oai-reuse"))
    lines = [line(f"r{i}", {"model": MODEL, "input": f"batch reuse {i}", "encoding_format": "float"})
             for i in range(6)]
    runs = [finished(oai, oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/embeddings",
                                             completion_window="24h").id) for _ in range(2)]
    assert [b.status for b in runs] == ["completed", "completed"]
    # an extension the official client keeps: request_counts.reused
    assert [b.request_counts.reused for b in runs] == [0, 6]
    assert [b.request_counts.completed for b in runs] == [6, 6]
    first, second = (sorted(jsonl(oai, b.output_file_id), key=lambda x: x["custom_id"]) for b in runs)
    assert [x["response"]["body"]["data"] for x in first] == [x["response"]["body"]["data"] for x in second]
