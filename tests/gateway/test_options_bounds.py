"""Hostile options, texts and bodies through REST and the Python client, on
the session's real gateway, Redis and Dask cluster (issue 14.1, 14.7, 14.8):
each is refused with a 4xx or a BitingLipError before any work starts, and
the scheduler still has every worker it had."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from gwtools import auth, wait_for
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bitinglip.errors import BitingLipError, InputError
from bitinglip.gateway.batcher import Batcher
from bitinglip.platform.cluster.local import worker_resources
from bitinglip.platform.tasks.builtin import BUILTIN_TASKS

MODEL_OF = {"embed": "tiny-encoder", "classify": "tiny-classifier", "generate": "tiny-gpt2"}
OPTIONS = [(task, name) for task, t in sorted(BUILTIN_TASKS.items()) for name in sorted(t.defaults)]
#: values no option takes, as JSON can carry them (NaN and Infinity too: Python's json writes them)
HOSTILE = st.one_of(
    st.integers(min_value=2**63, max_value=2**200), st.integers(max_value=-1, min_value=-(2**100)),
    st.just(2**64), st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(min_value=1e6, allow_infinity=False), st.floats(max_value=-1e-9, allow_infinity=False),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.lists(st.integers(), min_size=1, max_size=3),
    st.sampled_from(["", "x" * 300, "float64"]),
)


def _post(gateway: str, path: str, body: Any) -> httpx.Response:
    """``body`` as Python's json writes it (NaN, Infinity and "\\ud800" escapes
    included), from a principal of its own: the write rate limit (10 a minute)
    is per principal."""
    headers = {**auth(f"opt-{uuid.uuid4().hex[:12]}"), "Content-Type": "application/json"}
    return httpx.post(f"{gateway}{path}", headers=headers, content=json.dumps(body), timeout=60)


def _error(r: httpx.Response, status: int = 422) -> str:
    assert r.status_code == status, r.text
    return str(r.json()["error"]["message"])


def _workers(platform: Any) -> set[str]:
    return set(worker_resources(platform.client))


@pytest.fixture(scope="module")
def workers_at_start(platform: Any) -> set[str]:
    return _workers(platform)


def test_top_k_of_2_64_leaves_every_worker_connected(gateway: str, models: dict[str, str], platform: Any,
                                                     workers_at_start: set[str]) -> None:
    for task, options in (("classify", {"top_k": 2**64}), ("generate", {"top_k": 2**64}),
                          ("generate", {"seed": 2**64})):
        body = {"task": task, "model": MODEL_OF[task], "inputs": ["a b c"], "options": options}
        assert next(iter(options)) in _error(_post(gateway, "/v1/jobs", body))
        with pytest.raises(InputError, match=next(iter(options))):
            platform.submit(task, model=models[MODEL_OF[task]], inputs=["a b c"], options=options)
    # a normal job after them runs to its end on the same workers
    h = auth(f"opt-{uuid.uuid4().hex[:12]}")
    r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60, json={
        "task": "classify", "model": "tiny-classifier", "inputs": [f"row {i}" for i in range(40)],
        "options": {"top_k": 2}})
    assert r.status_code == 202, r.text
    done = wait_for(lambda: httpx.get(f"{gateway}/v1/jobs/{r.json()['id']}", headers=h, timeout=30).json())
    assert done["state"] == "succeeded" and done["rows_done"] == 40, done
    assert _workers(platform) == workers_at_start


@pytest.mark.parametrize("option", OPTIONS, ids="-".join)
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=HOSTILE, path=st.sampled_from(["/v1/infer", "/v1/jobs"]))
def test_hostile_options_get_a_4xx_and_a_bitinglip_error(gateway: str, models: dict[str, str], platform: Any,
                                                         workers_at_start: set[str], option: tuple[str, str],
                                                         value: Any, path: str) -> None:
    task, name = option
    assume(not (name == "stop" and value == "float64"))  # a fine stop string
    # a number from -2 to 2 is a fine presence or frequency penalty (OpenAI's range)
    assume(not (name in ("presence_penalty", "frequency_penalty") and isinstance(value, (int, float))
                and not isinstance(value, bool) and -2 <= value <= 2))
    body = {"task": task, "model": MODEL_OF[task], "inputs": ["a b c"], "options": {name: value}}
    r = _post(gateway, path, body)
    assert r.status_code == 422, r.text
    with pytest.raises(BitingLipError):
        platform.submit(task, model=models[MODEL_OF[task]], inputs=["a b c"], options={name: value})
    assert _workers(platform) == workers_at_start


def test_options_are_bounded_by_the_model(gateway: str, models: dict[str, str]) -> None:
    def infer(task: str, options: dict[str, Any]) -> httpx.Response:
        return _post(gateway, "/v1/infer", {"task": task, "model": MODEL_OF[task], "inputs": ["a b"],
                                            "options": options})

    assert "seed" in _error(infer("generate", {"seed": 2**70}))
    assert "max_tokens=128" in _error(infer("generate", {"max_new_tokens": 128}))  # 128 positions
    assert "top_k=501" in _error(infer("generate", {"top_k": 501, "temperature": 1.0}))  # 500 tokens
    assert "top_k=4" in _error(infer("classify", {"top_k": 4}))  # 3 labels
    ok = infer("classify", {"top_k": 3})
    assert ok.status_code == 200 and len(ok.json()["outputs"][0]["labels"]) == 3, ok.text
    longest = infer("generate", {"max_new_tokens": 127})
    assert longest.status_code == 200, longest.text
    # a REST job meets the same bounds in Platform.submit, once the model is resolved
    for task, options, word in (("classify", {"top_k": 4}, "top_k=4"),
                                ("generate", {"max_new_tokens": 128}, "max_tokens=128")):
        body = {"task": task, "model": MODEL_OF[task], "inputs": ["a b"], "options": options}
        assert word in _error(_post(gateway, "/v1/jobs", body))


def test_client_refuses_nan_timeout_and_options_not_a_mapping(platform: Any, models: dict[str, str]) -> None:
    for timeout in (math.nan, math.inf):
        with pytest.raises(InputError, match="timeout"):
            platform.submit("embed", model=models["tiny-encoder"], inputs=["a"], timeout=timeout)
    with pytest.raises(InputError, match="options"):
        platform.submit("embed", model=models["tiny-encoder"], inputs=["a"], options="x")


def test_deeply_nested_body_gets_a_422(gateway: str) -> None:
    headers = {**auth(f"opt-{uuid.uuid4().hex[:12]}"), "Content-Type": "application/json"}
    for body in ('{"task": ' + "[" * 50_000 + "]" * 50_000 + "}", '{"options": ' + "[" * 40 + "]" * 40 + "}"):
        r = httpx.post(f"{gateway}/v1/jobs", headers=headers, content=body, timeout=30)
        assert "nests deeper than 32 levels" in _error(r)
    r = httpx.post(f"{gateway}/v1/infer", headers=headers, timeout=30,
                   content='{"task": "generate", "model": "tiny-gpt2", "inputs": ["a"], "options": {"top_p": NaN}}')
    assert "NaN" in _error(r)


# --- 14.7: a text that cannot be encoded is a bad row, never a failed job or batch

def test_lone_surrogate_is_named_in_a_rest_body(gateway: str, models: dict[str, str]) -> None:
    for path in ("/v1/jobs", "/v1/infer"):
        r = _post(gateway, path, {"task": "embed", "model": "tiny-encoder", "inputs": ["fine", "bad \ud800"]})
        assert "inputs[1]" in _error(r) and "lone surrogate" in _error(r)


def test_lone_surrogate_in_concurrent_infer_fails_only_its_request(gateway: str, models: dict[str, str]) -> None:
    bodies = [{"task": "embed", "model": "tiny-encoder", "inputs": texts}
              for texts in (["good one"], ["bad \udc00"], ["good two"])]
    with ThreadPoolExecutor(3) as pool:
        good, bad, other = pool.map(lambda b: _post(gateway, "/v1/infer", b), bodies)
    assert good.status_code == other.status_code == 200 and "inputs[0]" in _error(bad)


def test_a_failing_merged_batch_fails_only_the_bad_request(platform: Any, tiny_encoder: Path) -> None:
    async def both() -> list[Any]:
        # a window long enough that both requests share one batch
        batcher = Batcher(platform.client, wait_s=0.5, max_rows=64)
        return await asyncio.gather(batcher.infer("embed", str(tiny_encoder), {}, ["good", "also good"]),
                                    batcher.infer("embed", str(tiny_encoder), {}, ["bad \ud800"]),
                                    return_exceptions=True)

    good, bad = asyncio.run(both())
    assert not isinstance(good, BaseException), good
    outputs, _ = good
    assert len(outputs) == 2 and all(len(o["embedding"]) == 32 for o in outputs)
    assert isinstance(bad, InputError) and "inputs[0]" in str(bad), bad


def test_lone_surrogate_row_goes_to_the_errors_table(platform: Any, tiny_encoder: Path, tmp_path: Path) -> None:
    texts = ["fine", "bad \ud800 row", "also fine", "more"]
    job = platform.submit("embed", model=str(tiny_encoder), inputs=texts, output=tmp_path / "out")
    rows, errors = job.result(), job.errors()
    assert sorted(rows["id"]) == [0, 2, 3] and errors["id"].tolist() == [1]
    assert "lone surrogate" in errors["reason"][0]
    assert len(rows) + len(errors) == len(texts)
    with pytest.raises(InputError, match=r"row id=1: .*lone surrogate"):
        platform.submit("embed", model=str(tiny_encoder), inputs=texts, fail_fast=True)

