"""A bound is declared once, in the tasks' contract, and every surface follows
it (issue 22): for each bounded field, the OpenAPI document's maximum, the
REST answer at the maximum and just past it (BitingLip's job API and OpenAI's
completions), the Python client's error and the CLI's error.  Each surface is
compared with the contract's value, never with a number written here, so a
bound changed in its one line keeps this green, and a surface that kept a
copy of the old value turns it red.

The REST part runs on the light gateway of ``test_openapi_units`` (no
Redis, no cluster: a body that passes its checks reaches a stand-in that
raises); the Python client's part on a Dask cluster with no workers (the
options are refused before any is needed)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the gateway extra is not installed")

from starlette.testclient import TestClient
from test_openapi_units import DOC, _accepted, client  # noqa: F401  (client: the light gateway fixture)

from bitinglip import cli
from bitinglip.cli_checks import cli_words
from bitinglip.errors import BitingLipError, UnknownModelError
from bitinglip.gateway import body as body_module
from bitinglip.platform.tasks import TASK_OPTIONS, Bound, JobFields, Sampling, bound, bounded, python_type

#: (task, option, its bound) for every task option with an upper bound
OPTIONS = [(task, name, b) for task, model in TASK_OPTIONS.items() for name, b in bounded(model)]
#: the generate task's sampling parameters, which OpenAI's bodies carry too
SAMPLING = [(name, b) for name, b in bounded(Sampling)]
#: what the old copies got wrong, so that this list cannot shrink to nothing unnoticed
assert {"temperature", "max_tokens", "n", "logprobs"} <= {name for name, _ in SAMPLING}


def _past(b: Bound, kind: type) -> float:
    """The least value above the maximum (the next float, for a real number)."""
    assert b.high is not None
    return int(b.high) + 1 if kind is int else math.nextafter(float(b.high), math.inf)


def _shown(high: Any) -> str:
    """A bound as the messages write it (2.0 as 2, a whole number in full)."""
    return f"{high:g}" if isinstance(high, float) else str(high)


def _maximum(schema: dict[str, Any]) -> Any:
    """``maximum`` of a schema, or of its one alternative that has one (``int | None``)."""
    found = [s["maximum"] for s in (schema, *schema.get("anyOf", ()), *schema.get("oneOf", ())) if "maximum" in s]
    assert len(found) == 1, schema
    return found[0]


def _component(name: str) -> dict[str, Any]:
    return DOC["components"]["schemas"][name]


def _task_options_schema(task: str) -> dict[str, Any]:
    (options,) = [s for s in _component("JobRequest")["properties"]["options"]["anyOf"] if s["title"] == task]
    return options["properties"]


def _only_on_workers(model: str, settings: Any) -> Any:
    raise UnknownModelError(f"{model} is not on the gateway's disk")


def _job(task: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"task": task, "model": "all-MiniLM-L6-v2", "inputs": ["a"], "options": options}


@pytest.mark.parametrize(("task", "name", "b"), OPTIONS, ids=[f"{t}.{n}" for t, n, _ in OPTIONS])
def test_the_document_says_each_task_options_bound(task: str, name: str, b: Bound) -> None:
    schema = _task_options_schema(task)[name]
    assert _maximum(schema) == b.high
    assert schema.get("exclusiveMinimum" if b.low_open else "minimum",
                      next((s.get("minimum") for s in schema.get("anyOf", ()) if "minimum" in s), None)) == b.low


@pytest.mark.parametrize(("name", "b"), SAMPLING, ids=[n for n, _ in SAMPLING])
def test_the_openai_bodies_say_each_sampling_bound(name: str, b: Bound) -> None:
    chat, completion = _component("ChatCompletionRequest")["properties"], _component("CompletionRequest")["properties"]
    assert _maximum(completion[name]) == b.high
    # chat: logprobs is a flag and top_logprobs the count
    assert _maximum(chat["top_logprobs" if name == "logprobs" else name]) == b.high
    if name == "max_tokens":
        assert _maximum(chat["max_completion_tokens"]) == b.high


@pytest.mark.parametrize(("task", "name", "b"), OPTIONS, ids=[f"{t}.{n}" for t, n, _ in OPTIONS])
def test_rest_jobs_take_the_maximum_and_refuse_past_it(client: tuple[TestClient, dict[str, str]],  # noqa: F811
                                                       task: str, name: str, b: Bound) -> None:
    http, headers = client
    kind = python_type(TASK_OPTIONS[task], name)
    assert _accepted(http, headers, "/v1/jobs", _job(task, {name: b.high})) is True
    message = _accepted(http, headers, "/v1/jobs", _job(task, {name: _past(b, kind)}))
    assert isinstance(message, str) and f"option {name}=" in message and _shown(b.high) in message, message


@pytest.mark.parametrize(("name", "b"), SAMPLING, ids=[n for n, _ in SAMPLING])
def test_openai_completions_take_the_maximum_and_refuse_past_it(client: tuple[TestClient, dict[str, str]],  # noqa: F811
                                                                name: str, b: Bound,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    http, headers = client
    # a model only the workers see keeps the fixed bounds (this gateway's packaged model has 512 positions)
    monkeypatch.setattr(body_module, "resolve_model", _only_on_workers)
    body = {"model": "all-MiniLM-L6-v2", "prompt": "once"}
    assert _accepted(http, headers, "/v1/completions", {**body, name: b.high}) is True
    r = http.post("/v1/completions", json={**body, name: _past(b, python_type(Sampling, name))}, headers=headers)
    assert r.status_code == 400, r.text  # OpenAI answers a bad request with 400
    error = r.json()["error"]
    assert error["param"] == name and f"{name}=" in error["message"] and _shown(b.high) in error["message"], error


JOB_FIELDS = [("priority", bound(JobFields, "priority")), ("text_column", bound(JobFields, "text_column"))]


def _at(name: str, high: Any, past: bool) -> Any:
    return ("c" * (int(high) + past)) if name == "text_column" else int(high) + past


@pytest.mark.parametrize(("name", "b"), JOB_FIELDS, ids=[n for n, _ in JOB_FIELDS])
def test_a_jobs_own_fields_follow_their_bound(client: tuple[TestClient, dict[str, str]],  # noqa: F811
                                              name: str, b: Bound) -> None:
    schema = _component("JobRequest")["properties"][name]
    assert schema["maxLength" if name == "text_column" else "maximum"] == b.high
    http, headers = client
    assert _accepted(http, headers, "/v1/jobs", {**_job("embed", {}), name: _at(name, b.high, False)}) is True
    message = _accepted(http, headers, "/v1/jobs", {**_job("embed", {}), name: _at(name, b.high, True)})
    assert isinstance(message, str) and f"{name}=" in message and _shown(b.high) in message, message


# --- the Python client and the CLI


@pytest.fixture(scope="module")
def platform() -> Iterator[Any]:
    """A Platform on a scheduler with no workers: options are refused before one is needed."""
    from distributed import Client, LocalCluster

    from bitinglip.platform.jobs import Platform

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster, Client(cluster) as dask:
        yield Platform(dask, cluster)


def _client_error(platform: Any, task: str, name: str, value: Any) -> str:
    kwargs = {"text_column": value} if task == "job" else {"options": {name: value}}
    with pytest.raises(BitingLipError) as err:
        platform.submit("embed" if task == "job" else task, "no-such-model", ["a"], **kwargs)
    return str(err.value)


def _cli_error(capsys: pytest.CaptureFixture[str], task: str, name: str, value: Any) -> str:
    args = ["run", "--task", "embed" if task == "job" else task, "--model", "no-such-model", "--input", "sample:1"]
    args += ["--text-column", value] if task == "job" else ["--option", f"{name}={json.dumps(value)}"]
    assert cli.main(args) == 1
    return capsys.readouterr().err.strip()


CLIENT_CASES = [*OPTIONS, ("job", "text_column", bound(JobFields, "text_column"))]


@pytest.mark.cluster
@pytest.mark.parametrize(("task", "name", "b"), CLIENT_CASES, ids=[f"{t}.{n}" for t, n, _ in CLIENT_CASES])
def test_the_python_client_and_the_cli_refuse_past_the_bound_alike(platform: Any, capsys: pytest.CaptureFixture[str],
                                                                   task: str, name: str, b: Bound) -> None:
    if task == "job":
        past, at = _at(name, b.high, True), _at(name, b.high, False)
    else:
        kind = python_type(TASK_OPTIONS[task], name)
        past, at = _past(b, kind), b.high
    said = _client_error(platform, task, name, past)
    assert f"{name}=" in said and _shown(b.high) in said, said
    assert _cli_error(capsys, task, name, past) == f"bitinglip: {cli_words(said)}"
    # at the bound both go on, to the model (which does not exist)
    assert "no-such-model" in _client_error(platform, task, name, at)
    assert "no-such-model" in _cli_error(capsys, task, name, at)


def test_run_help_lists_every_option_with_its_bound_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    sections: dict[str, dict[str, str]] = {}
    for line in capsys.readouterr().out.split("task options", 1)[1].splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("    "):
            task = line.strip().rstrip(":")
            sections[task] = {}
        elif line.startswith("    "):
            name, shown = line.strip().split(None, 1)
            sections[task][name] = shown
    assert set(sections) == set(TASK_OPTIONS)
    for task, model in TASK_OPTIONS.items():
        assert set(sections[task]) == set(model.model_fields), task
        for name, field in model.model_fields.items():
            default = field.default
            written = "null" if default is None else "[]" if default == () else str(default).lower()
            assert sections[task][name].endswith(f", default {written}"), (task, name)
    for task, name, b in OPTIONS:
        low = f"{'(' if b.low_open else '['}{_shown(b.low)}"
        assert f"{low}, {_shown(b.high)}]" in sections[task][name], (task, name)


def test_embeddings_dimensions_follow_its_bound(client: tuple[TestClient, dict[str, str]]) -> None:  # noqa: F811
    from bitinglip.gateway.openai.bodies import MAX_DIMENSIONS

    assert _component("EmbeddingRequest")["properties"]["dimensions"]["maximum"] == MAX_DIMENSIONS
    http, headers = client
    body = {"model": "all-MiniLM-L6-v2", "input": "a"}
    at = http.post("/v1/embeddings", json={**body, "dimensions": MAX_DIMENSIONS}, headers=headers).json()["error"]
    assert at["param"] == "dimensions" and "model's 384" in at["message"], at  # past the model's width, not the bound
    past = http.post("/v1/embeddings", json={**body, "dimensions": MAX_DIMENSIONS + 1}, headers=headers).json()["error"]
    assert past["param"] == "dimensions" and "up to the model's size" in past["message"], past
