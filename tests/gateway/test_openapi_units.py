"""/openapi.json against what the gateway does, without a cluster or Redis:
every route is documented and nothing else; each documented request body is
the one its handler takes (fields, required fields, nothing more); each
documented success status is one its handler returns, and the reverse."""

from __future__ import annotations

import ast
import copy
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the gateway extra is not installed")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (pip install -e '.[dev]')")

from starlette.testclient import TestClient

from bitinglip.gateway import app as app_module
from bitinglip.gateway.auth import mint
from bitinglip.gateway.openapi import document
from bitinglip.gateway.ratelimit import Verdict
from bitinglip.gateway.routes import models as models_routes
from bitinglip.settings import Settings

SECRET = "openapi-units-secret-long-enough-for-hs256!"
DOC = document()
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def _documented_path(route_path: str) -> str:
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", route_path)  # Starlette's {name:path} is OpenAPI's {name}


def _routes() -> Iterator[tuple[str, str, Callable[..., Any]]]:
    for route in app_module.ROUTES:
        for method in sorted(route.methods or ()):
            if method.lower() in HTTP_METHODS:
                yield _documented_path(route.path), method.lower(), route.endpoint


def test_every_route_is_documented_and_nothing_else() -> None:
    served = {(path, method) for path, method, _ in _routes()}
    documented = {(path, method) for path, item in DOC["paths"].items() for method in item if method in HTTP_METHODS}
    assert served == documented
    for path, item in DOC["paths"].items():  # every path parameter is declared, and only those
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), (method, path)


# --- responses: the success statuses a handler returns, read from its code


def _statuses(func: Callable[..., Any], seen: set[str] | None = None) -> set[int]:
    """Every 2xx status ``func`` answers with: ``gw.json(request, body[, status])``,
    ``Response(status_code=...)``, a streaming response (200); calls to other
    functions of its module are followed."""
    seen = seen if seen is not None else set()
    seen.add(func.__name__)
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    module = inspect.getmodule(func)
    found: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        status = next((k.value for k in node.keywords if k.arg in ("status", "status_code")), None)
        if name == "json" and isinstance(node.func, ast.Attribute) and len(node.args) >= 2:
            status = node.args[2] if len(node.args) > 2 else status
            found.add(status.value if isinstance(status, ast.Constant) else 200)
        elif name in ("Response", "StreamingResponse", "PlainTextResponse", "FileResponse", "JSONResponse"):
            found.add(status.value if isinstance(status, ast.Constant) else 200)
        elif name not in seen and inspect.isfunction(getattr(module, name, None)) \
                and getattr(module, name).__module__ == module.__name__:
            found |= _statuses(getattr(module, name), seen)
    return {s for s in found if 200 <= s < 300}


@pytest.mark.parametrize(("path", "method", "endpoint"), list(_routes()), ids=lambda v: getattr(v, "__name__", v))
def test_documented_success_statuses_are_the_ones_returned(path: str, method: str,
                                                           endpoint: Callable[..., Any]) -> None:
    documented = {int(code) for code in DOC["paths"][path][method]["responses"] if code.startswith("2")}
    assert _statuses(endpoint) == documented, f"{method.upper()} {path}"


def test_the_status_reader_sees_a_documented_status_that_is_never_returned() -> None:
    async def register(request: Any) -> Any:  # the shape of the handler that once documented "200 replaced"
        gw: Any = request.app.state.gateway
        return gw.json(request, {}, 201)

    assert _statuses(register) == {201} != {200, 201}


# --- request bodies: the documented schema against the handler, on a gateway with no Redis and no cluster


class _Past(Exception):
    """The handler got past its body checks to the cluster, Redis or the registry."""

    #: how many were raised: the gateway answers an unexpected exception itself (a 500 that keeps the
    #: connection), so the test client sees the 500, and this count says that it was this one
    raised = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        _Past.raised += 1


class _Unreachable:
    def __getattr__(self, name: str) -> Any:
        raise _Past(name)


class _Limiter:
    async def hit(self, bucket: str, subject: str) -> Verdict:
        return Verdict(100, 99, 60, bucket, subject)

    async def refund(self, verdict: Verdict) -> None:
        return None


class _Registry:
    def __init__(self, settings: Settings) -> None:
        pass

    def add(self, *args: Any, **kwargs: Any) -> Any:
        raise _Past("registry.add")

    def locate(self, ref: str) -> Any:
        raise _Past("registry.locate")


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, dict[str, str]]]:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.jsonl").write_text('{"text": "a"}\n')
    settings = Settings(redis_url="redis://127.0.0.1:1/0", jwt_secret=SECRET, results_dir=tmp_path / "results",
                        model_cache_dir=tmp_path / "cache", input_dir=tmp_path / "in")
    app = app_module.create_app(settings)  # no lifespan: nothing connects
    gw = app.state.gateway
    gw.limiter, gw.store, gw.platform, gw.batcher = _Limiter(), _Unreachable(), _Unreachable(), _Unreachable()
    gw.streams = _Unreachable()  # the token streams (a streamed chat) ride the cluster too
    monkeypatch.setattr(models_routes, "Registry", _Registry)
    token = mint(settings, "alice", ["jobs:read", "jobs:write", "admin"])
    yield TestClient(app, raise_server_exceptions=True, client=("127.0.0.1", 50000)), {"Authorization": f"Bearer {token}"}


#: a valid value of every documented field, per body; alternatives that exclude each other are separate bodies
VALID = {
    ("/v1/jobs", "post"): [
        {"task": "embed", "model": "all-MiniLM-L6-v2", "inputs": ["a", "b"], "text_column": "text",
         "options": {"normalize": True}, "priority": 3, "idempotency_key": "k:1"},
        {"task": "embed", "model": "all-MiniLM-L6-v2", "input_uri": "rows.jsonl"},
    ],
    ("/v1/infer", "post"): [{"task": "embed", "model": "all-MiniLM-L6-v2", "inputs": ["a"], "options": {}}],
    ("/admin/models", "post"): [{"name": "m", "source": "/models/m", "task": "embed", "dtype": "float16",
                                 "max_length": 128, "pooling": "mean"}],
    ("/v1/batches", "post"): [{"input_file_id": "file-abc", "endpoint": "/v1/embeddings", "completion_window": "24h",
                               "metadata": {"idempotency_key": "k1"},
                               "output_expires_after": {"anchor": "created_at", "seconds": 7200}}],
    ("/v1/embeddings", "post"): [{"model": "all-MiniLM-L6-v2", "input": ["a", "b"], "encoding_format": "base64",
                                  "dimensions": 8, "user": "u"}],
    ("/v1/chat/completions", "post"): [{
        "model": "all-MiniLM-L6-v2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "max_completion_tokens": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
        "repetition_penalty": 1.1, "presence_penalty": 0.1, "frequency_penalty": 0.1, "stop": ["x"], "seed": 1,
        "n": 2, "response_format": {"type": "json_object"}, "stream": True, "stream_options": {"include_usage": True},
        "user": "u", "logprobs": True, "top_logprobs": 2}],
    ("/v1/completions", "post"): [{
        "model": "all-MiniLM-L6-v2", "prompt": "once", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9,
        "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "presence_penalty": 0.1, "frequency_penalty": 0.1,
        "stop": "x", "seed": 1, "n": 2, "response_format": {"type": "json_object"}, "stream": False,
        "stream_options": {"include_usage": False}, "user": "u", "logprobs": 2, "echo": False, "suffix": None,
        "best_of": 1}],
    ("/v1/responses", "post"): [
        {"model": "all-MiniLM-L6-v2", "input": "hi", "instructions": "be brief", "max_output_tokens": 4,
         "temperature": 0.5, "top_p": 0.9, "metadata": {"k": "v"}, "user": "u", "store": False, "stream": False,
         "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}, "strict": True,
                             "description": "d"}}},
        {"model": "all-MiniLM-L6-v2", "input": [{"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "hi"}]}]},
    ],
}


def _body_schema(path: str, method: str) -> dict[str, Any]:
    ref = DOC["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return DOC["components"]["schemas"][ref.rsplit("/", 1)[1]]


def _accepted(client: TestClient, headers: dict[str, str], path: str, body: dict[str, Any]) -> bool | str:
    """True when the handler takes the body (gets past its checks), else its 4xx message."""
    before = _Past.raised
    try:
        r = client.post(path, json=body, headers=headers)
    except _Past:
        return True
    if r.status_code == 500 and _Past.raised > before:
        return True
    assert 400 <= r.status_code < 500, r.text
    return str(r.json()["error"]["message"])


def test_every_documented_body_is_listed_here() -> None:
    with_body = {(p, m) for p, item in DOC["paths"].items() for m, op in item.items() if "requestBody" in op}
    assert with_body == set(VALID)


@pytest.mark.parametrize(("path", "method"), list(VALID))
def test_documented_bodies_are_the_bodies_the_handler_takes(client: tuple[TestClient, dict[str, str]], path: str,
                                                            method: str) -> None:
    http, headers = client
    schema = _body_schema(path, method)
    assert {name for body in VALID[(path, method)] for name in body} == set(schema["properties"])
    for body in VALID[(path, method)]:
        jsonschema.validate(body, schema)
        assert _accepted(http, headers, path, body) is True, body

        extra = {**body, "colour": "red"}  # a field the document does not name
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(extra, schema)
        assert "unknown field colour" in str(_accepted(http, headers, path, extra))

        for name in schema["required"]:
            missing = {k: v for k, v in body.items() if k != name}
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(missing, schema)
            assert _accepted(http, headers, path, missing) is not True, (path, name)

        for name in set(body) - set(schema["required"]):  # an optional field may be left out
            fewer = {k: v for k, v in body.items() if k != name}
            if any(set(alt["required"]) <= set(fewer) for alt in schema.get("oneOf", [{"required": []}])):
                jsonschema.validate(fewer, schema)
                assert _accepted(http, headers, path, fewer) is True, (path, name)


def test_jobs_take_exactly_one_of_inputs_and_input_uri(client: tuple[TestClient, dict[str, str]]) -> None:
    http, headers = client
    schema = _body_schema("/v1/jobs", "post")
    both = {"task": "embed", "model": "all-MiniLM-L6-v2", "inputs": ["a"], "input_uri": "rows.jsonl"}
    for body in (both, {"task": "embed", "model": "all-MiniLM-L6-v2"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, schema)
        assert "exactly one of inputs" in str(_accepted(http, headers, "/v1/jobs", body))


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/jobs", "task", "paint"), ("/v1/jobs", "priority", 11), ("/v1/jobs", "idempotency_key", "a b"),
    ("/v1/jobs", "text_column", ""), ("/v1/jobs", "inputs", []), ("/v1/infer", "task", "paint"),
    ("/v1/batches", "endpoint", "/v1/images"), ("/v1/batches", "completion_window", "1h"),
    ("/v1/embeddings", "input", 5), ("/v1/chat/completions", "messages", []), ("/v1/completions", "best_of", 2),
    ("/v1/chat/completions", "stream", "yes"), ("/v1/completions", "echo", True), ("/v1/embeddings", "encoding_format", "hex"), ("/v1/embeddings", "dimensions", 0),
    ("/admin/models", "dtype", "float8"), ("/admin/models", "pooling", "sum"), ("/admin/models", "max_length", 0),
])
def test_values_the_document_refuses_the_handler_refuses(client: tuple[TestClient, dict[str, str]], path: str,
                                                         field: str, value: Any) -> None:
    http, headers = client
    body = copy.deepcopy(VALID[(path, "post")][0])
    body[field] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, _body_schema(path, "post"))
    if path == "/admin/models":  # the registry checks dtype, pooling and max_length: ours is a stand-in
        return
    assert _accepted(http, headers, path, body) is not True
