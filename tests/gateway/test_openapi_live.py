"""Every documented operation of /openapi.json, called on a real gateway
(Redis and a local cluster): the status it answers is documented for it, and
a JSON body matches the documented schema."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from gwtools import auth, wait_for

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (pip install -e '.[dev]')")


class Walker:
    def __init__(self, url: str, doc: dict[str, Any]) -> None:
        self.url, self.doc = url, doc
        self.called: set[tuple[str, str]] = set()

    def call(self, method: str, template: str, headers: dict[str, str] | None = None,
             path: str | None = None, **kwargs: Any) -> httpx.Response:
        r = httpx.request(method, f"{self.url}{path or template}", headers=headers, timeout=60, **kwargs)
        op = self.doc["paths"][template][method.lower()]
        self.called.add((template, method.lower()))
        assert str(r.status_code) in op["responses"], f"{method} {template}: {r.status_code} is not documented"
        documented = op["responses"][str(r.status_code)]
        documented = self.doc["components"]["responses"]["Error"] if "$ref" in documented else documented
        content = documented.get("content")
        if content is None:  # documented without a body (204)
            assert not r.content, f"{method} {template}: a body where none is documented"
            return r
        media = r.headers.get("content-type", "").split(";")[0]
        assert media in content, f"{method} {template}: {media} is not documented for {r.status_code}"
        schema = content[media].get("schema")
        if schema is not None:  # refs resolve against the document's own components
            jsonschema.validate(r.json(), {**schema, "components": self.doc["components"]})
        return r


def _openai_routes(w: Walker, h: dict[str, str]) -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny-encoder", "input": "a"}}
    file = w.call("POST", "/v1/files", h, files={"file": ("b.jsonl", json.dumps(line).encode())},
                  data={"purpose": "batch"}).json()
    w.call("GET", "/v1/files", h)
    w.call("GET", "/v1/files/{file_id}", h, path=f"/v1/files/{file['id']}")
    w.call("GET", "/v1/files/{file_id}/content", h, path=f"/v1/files/{file['id']}/content")
    batch = w.call("POST", "/v1/batches", h, json={"input_file_id": file["id"], "endpoint": "/v1/embeddings",
                                                   "completion_window": "24h"}).json()
    w.call("GET", "/v1/batches", h)
    w.call("GET", "/v1/batches/{batch_id}", h, path=f"/v1/batches/{batch['id']}")
    assert w.call("POST", "/v1/batches/{batch_id}/cancel", h,
                  path=f"/v1/batches/{batch['id']}/cancel").status_code in (200, 409)  # 409: it had ended
    w.call("POST", "/v1/embeddings", h, json={"model": "tiny-encoder", "input": ["a"], "encoding_format": "float"})
    w.call("DELETE", "/v1/files/{file_id}", h, path=f"/v1/files/{file['id']}")
    # refused before any generation (tests/gateway/test_openai.py runs them whole): a documented 400 each
    assert w.call("POST", "/v1/chat/completions", h, json={"model": "tiny-gpt2", "messages": []}).status_code == 400
    assert w.call("POST", "/v1/completions", h, json={"model": "tiny-gpt2", "prompt": ["a", "b"]}).status_code == 400
    assert w.call("POST", "/v1/responses", h, json={"model": "tiny-gpt2", "input": []}).status_code == 400


def test_every_documented_operation_answers_as_documented(gateway: str, admin: dict[str, str],
                                                          models: dict[str, str]) -> None:
    h = auth("openapi-walker")
    doc = httpx.get(f"{gateway}/openapi.json", headers=h, timeout=30).json()
    w = Walker(gateway, doc)
    w.call("GET", "/openapi.json", h)
    for path in ("/health", "/health/live", "/health/ready"):
        w.call("GET", path)
    w.call("GET", "/v1/models", h)
    w.call("GET", "/v1/models/{name}", h, path="/v1/models/tiny-encoder")
    job = w.call("POST", "/v1/jobs", h, json={"task": "embed", "model": "tiny-encoder", "inputs": ["a", "b"]}).json()
    at = f"/v1/jobs/{job['id']}"
    w.call("GET", "/v1/jobs", h)
    wait_for(lambda: w.call("GET", "/v1/jobs/{job_id}", h, path=at).json(), ("succeeded",))
    w.call("GET", "/v1/jobs/{job_id}/results", h, path=f"{at}/results")
    files = w.call("GET", "/v1/jobs/{job_id}/results/files", h, path=f"{at}/results/files").json()["files"]
    w.call("GET", "/v1/jobs/{job_id}/results/files/{name}", h, path=files[0]["url"])
    w.call("GET", "/v1/jobs/{job_id}/events", h, path=f"{at}/events")
    assert w.call("DELETE", "/v1/jobs/{job_id}", h, path=at).status_code == 409  # it has ended
    assert w.call("POST", "/v1/jobs/{job_id}/resume", h, path=f"{at}/resume").status_code == 409  # it succeeded
    w.call("POST", "/v1/infer", h, json={"task": "embed", "model": "tiny-encoder", "inputs": ["a"]})
    _openai_routes(w, h)
    w.call("GET", "/metrics", h)
    w.call("GET", "/admin/models", admin)
    added = w.call("POST", "/admin/models", admin, json={"name": "openapi-walk", "source": models["tiny-encoder"],
                                                         "task": "embed"})
    assert added.status_code == 201, added.text
    w.call("DELETE", "/admin/models/{name}", admin, path="/admin/models/openapi-walk")
    w.call("GET", "/admin/jobs", admin)
    w.call("GET", "/v1/jobs/{job_id}", h, path="/v1/jobs/" + "0" * 32)  # an error body, as documented
    documented = {(p, m) for p, item in doc["paths"].items() for m in item}
    assert w.called == documented
