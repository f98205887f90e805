"""The REST API over HTTP: job lifecycle, security rules, health, metrics."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import numpy as np
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from gwtools import SECRET, auth, get_json, make_token, new_user, wait_for

TEXTS = [f"row {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(50)]


def user() -> str:
    return new_user("user")


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"code", "message", "type", "param", "request_id"}  # OpenAI's shape, with the request id
    assert body["request_id"] == r.headers["x-request-id"]
    if code:
        assert body["code"] == code
    return dict(body)


# --- the job lifecycle

def test_job_lifecycle(gateway: str, models: dict[str, str]) -> None:
    h = auth(user())
    r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60,
                   json={"task": "embed", "model": "tiny-encoder", "inputs": TEXTS, "priority": 7})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running", "succeeded") and job["rows_total"] == len(TEXTS)
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert int(r.headers["x-ratelimit-limit"]) == 10

    done = wait_for(lambda: get_json(f"{gateway}/v1/jobs/{job['id']}", h))
    assert done["state"] == "succeeded", done
    assert done["rows_done"] == done["rows_total"] == len(TEXTS)
    assert done["eta_s"] == 0 and done["priority"] == 7 and done["error"] is None

    page = get_json(f"{gateway}/v1/jobs/{job['id']}/results?offset=0&limit=20", h)
    assert [row["id"] for row in page["rows"]] == list(range(20))
    assert page["total"] == len(TEXTS) and page["next_offset"] == 20
    last = get_json(f"{gateway}/v1/jobs/{job['id']}/results?offset=40&limit=20", h)
    assert [row["id"] for row in last["rows"]] == list(range(40, 50)) and last["next_offset"] is None
    assert len({len(row["embedding"]) for row in page["rows"]}) == 1

    files = get_json(f"{gateway}/v1/jobs/{job['id']}/results/files", h)["files"]
    frames = []
    for f in files:
        r = httpx.get(f"{gateway}{f['url']}", headers=h, timeout=30)
        assert r.status_code == 200
        frames.append(pq.read_table(io.BytesIO(r.content)).to_pandas())
    assert sum(len(f) for f in frames) == len(TEXTS)
    np.testing.assert_allclose(frames[0]["embedding"][0], page["rows"][0]["embedding"], rtol=1e-6)
    bad = httpx.get(f"{gateway}/v1/jobs/{job['id']}/results/files/..%2F_manifest.json", headers=h)
    assert bad.status_code == 404

    listed = get_json(f"{gateway}/v1/jobs", h)
    assert [j["id"] for j in listed["jobs"]] == [job["id"]] and listed["total"] == 1

    with httpx.stream("GET", f"{gateway}/v1/jobs/{job['id']}/events", headers=h, timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [line for line in stream.iter_lines() if line.startswith(("event:", "data:"))]
    assert events[-2] == "event: end" and json.loads(events[-1][5:])["state"] == "succeeded"

    again = httpx.delete(f"{gateway}/v1/jobs/{job['id']}", headers=h)
    assert_error(again, 409, "conflict")


def test_a_resubmitted_job_reuses_its_owners_rows_and_says_so(gateway: str, models: dict[str, str]) -> None:
    texts = [f"reuse {i}: a row embedded twice by its owner" for i in range(12)]
    owner, other = auth(user()), auth(user())

    def run(h: dict[str, str], rows: list[str]) -> dict[str, Any]:
        r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60,
                       json={"task": "embed", "model": "tiny-encoder", "inputs": rows})
        assert r.status_code == 202, r.text
        done = wait_for(lambda: get_json(f"{gateway}/v1/jobs/{r.json()['id']}", h))
        assert done["state"] == "succeeded", done
        return done

    assert run(owner, texts)["rows_reused"] == 0
    again = run(owner, [*texts[:-1], texts[-1] + "."])
    assert again["rows_reused"] == len(texts) - 1 and again["rows_done"] == len(texts)
    assert run(other, texts)["rows_reused"] == 0  # another token's subject sees none of the owner's rows
    first = get_json(f"{gateway}/v1/jobs", owner)["jobs"]
    rows = [get_json(f"{gateway}/v1/jobs/{j['id']}/results", owner)["rows"] for j in first]
    assert rows[0][:-1] == rows[1][:-1] and rows[0][-1] != rows[1][-1]  # reused rows exactly as computed


def test_results_match_the_python_client(gateway: str, models: dict[str, str], platform: Any) -> None:
    h = auth(user())
    r = httpx.post(f"{gateway}/v1/jobs", headers=h, json={"task": "embed", "model": "tiny-encoder",
                                                          "inputs": TEXTS[:5]}, timeout=60)
    job = wait_for(lambda: get_json(f"{gateway}/v1/jobs/{r.json()['id']}", h))
    assert job["state"] == "succeeded"
    rows = get_json(f"{gateway}/v1/jobs/{job['id']}/results", h)["rows"]
    expected = platform.submit("embed", model=models["tiny-encoder"], inputs=TEXTS[:5]).result()
    np.testing.assert_allclose(np.stack([r["embedding"] for r in rows]), np.stack(expected["embedding"]),
                               rtol=1e-5, atol=1e-6)


def test_idempotency_key_gives_the_same_job(gateway: str, models: dict[str, str]) -> None:
    h = auth(user())
    body = {"task": "embed", "model": "tiny-encoder", "inputs": TEXTS[:3], "idempotency_key": "order-42"}
    first = httpx.post(f"{gateway}/v1/jobs", headers=h, json=body, timeout=60)
    second = httpx.post(f"{gateway}/v1/jobs", headers=h, json=body, timeout=60)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers.get("idempotent-replayed") == "true"
    assert get_json(f"{gateway}/v1/jobs", h)["total"] == 1


def test_failed_job_reports_the_error(gateway: str, admin: dict[str, str], tmp_path: Any) -> None:
    import torch
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    save_file({"w": torch.zeros(2)}, str(broken / "model.safetensors"))
    r = httpx.post(f"{gateway}/admin/models", headers=admin, timeout=60,
                   json={"name": "broken", "source": str(broken), "task": "embed"})
    assert r.status_code in (200, 201), r.text
    h = auth(user())
    r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60,
                   json={"task": "embed", "model": "broken", "inputs": ["a", "b"]})
    assert r.status_code == 202, r.text
    job = wait_for(lambda: get_json(f"{gateway}/v1/jobs/{r.json()['id']}", h))
    assert job["state"] == "failed" and job["error"], job
    assert_error(httpx.get(f"{gateway}/v1/jobs/{job['id']}/results", headers=h), 409, "conflict")
    assert httpx.delete(f"{gateway}/admin/models/broken", headers=admin).status_code == 204


def test_cancel_a_running_job(gateway: str, models: dict[str, str]) -> None:
    h = auth(user())
    r = httpx.post(f"{gateway}/v1/jobs", headers=h, timeout=60,
                   json={"task": "generate", "model": "tiny-gpt2", "inputs": TEXTS * 40,
                         "options": {"max_new_tokens": 24}})
    assert r.status_code == 202, r.text
    cancelled = httpx.delete(f"{gateway}/v1/jobs/{r.json()['id']}", headers=h, timeout=30)
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    time.sleep(1.5)  # let the cluster's last word arrive: it must not overwrite the cancellation
    assert get_json(f"{gateway}/v1/jobs/{r.json()['id']}", h)["state"] == "cancelled"


def test_infer_answers_inline(gateway: str, models: dict[str, str], platform: Any) -> None:
    h = auth(user())
    r = httpx.post(f"{gateway}/v1/infer", headers=h, timeout=60,
                   json={"task": "embed", "model": "tiny-encoder", "inputs": TEXTS[:3]})
    assert r.status_code == 200, r.text
    outputs = r.json()["outputs"]
    expected = platform.submit("embed", model=models["tiny-encoder"], inputs=TEXTS[:3]).result()
    np.testing.assert_allclose(np.stack([o["embedding"] for o in outputs]), np.stack(expected["embedding"]),
                               rtol=1e-5, atol=1e-6)
    r = httpx.post(f"{gateway}/v1/infer", headers=h, timeout=60,
                   json={"task": "classify", "model": "tiny-classifier", "inputs": ["good", "bad"]})
    assert r.status_code == 200, r.text
    assert [set(o) >= {"label", "score", "truncated"} for o in r.json()["outputs"]] == [True, True]


@pytest.mark.parametrize("body, fragment", [
    ({"task": "paint", "model": "tiny-encoder", "inputs": ["a"]}, "task must be one of"),
    ({"task": "embed", "model": "/etc", "inputs": ["a"]}, "unknown model"),
    ({"task": "embed", "model": "tiny-encoder", "inputs": ["a"] * 5001}, "limit is 5000"),
    ({"task": "embed", "model": "tiny-encoder", "inputs": ["a" * 2001]}, "limit is 2000"),
    ({"task": "embed", "model": "tiny-encoder", "inputs": ["a"], "priority": 11}, "priority"),
    ({"task": "embed", "model": "tiny-encoder", "inputs": [1]}, "must be a string"),
    ({"task": "embed", "model": "tiny-encoder", "inputs": ["a"], "options": {"pickle": "x"}}, "no option"),
    ({"task": "embed", "model": "tiny-encoder", "input_uri": "file:///etc/passwd"}, "disabled"),
    ({"task": "embed", "model": "tiny-encoder", "inputs": ["a"], "code": "import os"}, "unknown field"),
])
def test_submissions_are_validated(gateway: str, models: dict[str, str], body: dict[str, Any],
                                   fragment: str) -> None:
    r = httpx.post(f"{gateway}/v1/jobs", headers=auth(user()), json=body, timeout=30)
    assert fragment in assert_error(r, 422)["message"]


def test_infer_row_limit(gateway: str, models: dict[str, str]) -> None:
    r = httpx.post(f"{gateway}/v1/infer", headers=auth(user()), timeout=30,
                   json={"task": "embed", "model": "tiny-encoder", "inputs": ["a"] * 17})
    assert "limit is 16" in assert_error(r, 422, "invalid_input")["message"]


def test_not_json(gateway: str) -> None:
    r = httpx.post(f"{gateway}/v1/jobs", headers={**auth(user()), "Content-Type": "application/json"},
                   content=b"{nope")
    assert_error(r, 422, "invalid_input")


# --- security

def test_token_rules(gateway: str) -> None:
    url = f"{gateway}/v1/jobs"
    assert_error(httpx.get(url), 401, "unauthorized")
    unsigned = jwt.encode({"sub": "eve", "scope": "jobs:read", "exp": int(time.time()) + 60}, None,
                          algorithm="none")
    assert_error(httpx.get(url, headers={"Authorization": f"Bearer {unsigned}"}), 401)
    expired = make_token("eve", ttl=-10)
    assert "expired" in assert_error(httpx.get(url, headers={"Authorization": f"Bearer {expired}"}), 401)["message"]
    wrong_key = make_token("eve", key="another-secret-another-secret-another!")
    assert_error(httpx.get(url, headers={"Authorization": f"Bearer {wrong_key}"}), 401)
    no_sub = jwt.encode({"scope": "jobs:read", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert_error(httpx.get(url, headers={"Authorization": f"Bearer {no_sub}"}), 401)
    # RS256 token while the gateway expects HS256 (algorithm confusion)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    rs = jwt.encode({"sub": "eve", "scope": "jobs:read", "exp": int(time.time()) + 60}, pem, algorithm="RS256")
    assert_error(httpx.get(url, headers={"Authorization": f"Bearer {rs}"}), 401)
    read_only = auth("eve", "jobs:read")
    r = httpx.post(url, headers=read_only, json={"task": "embed", "model": "x", "inputs": ["a"]})
    assert "jobs:write" in assert_error(r, 403, "forbidden")["message"]
    assert_error(httpx.get(url, headers=auth("eve", "jobs:write")), 403)
    assert httpx.get(url, headers=read_only).status_code == 200
    assert httpx.get(f"{gateway}/health/live").status_code == 200  # health needs no token


def test_eleventh_submission_in_a_minute_is_refused(gateway: str, models: dict[str, str]) -> None:
    h = auth(user())
    valid = {"task": "embed", "model": "tiny-encoder", "inputs": ["a"]}
    body = {"task": "embed", "model": "no-such-model", "inputs": ["a"]}  # invalid: gives its slot back (13.10)
    codes = [httpx.post(f"{gateway}/v1/jobs", headers=h, json=valid, timeout=60).status_code for _ in range(10)]
    assert codes == [202] * 10
    r = httpx.post(f"{gateway}/v1/jobs", headers=h, json=valid)
    assert_error(r, 429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-limit"] == "10" and r.headers["x-ratelimit-remaining"] == "0"
    assert_error(httpx.post(f"{gateway}/v1/infer", headers=h, json=body), 422)  # infer has its own bucket
    ok = httpx.get(f"{gateway}/v1/jobs", headers=h)  # reads have their own, higher limit
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit"] == "600"
    assert httpx.post(f"{gateway}/v1/jobs", headers=auth(user()), json=body).status_code == 422  # per subject
    metrics = httpx.get(f"{gateway}/metrics", headers=h).text
    assert 'bitinglip_rate_limit_rejections_total{bucket="write"}' in metrics
    assert float(metrics.split('bitinglip_rate_limit_rejections_total{bucket="write"} ')[1].split()[0]) >= 1


def test_admin_routes_need_scope_and_address(gateway: str, admin: dict[str, str]) -> None:
    url = f"{gateway}/admin/jobs"
    assert httpx.get(url, headers=admin).status_code == 200
    assert_error(httpx.get(url, headers=auth("bob", "jobs:read jobs:write")), 403)
    # the gateway trusts 127.0.0.0/8 as a proxy here, so the forwarded address decides
    far = {**admin, "X-Forwarded-For": "203.0.113.9"}
    assert "203.0.113.9" in assert_error(httpx.get(url, headers=far), 403, "forbidden")["message"]
    listed = {**admin, "X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
    assert httpx.get(url, headers=listed).status_code == 200
    # a malformed chain names no caller; the proxy itself (allowlisted here) is not the caller either
    assert_error(httpx.get(url, headers={**admin, "X-Forwarded-For": "garbage"}), 403, "forbidden")
    assert_error(httpx.post(f"{gateway}/admin/models", headers=far,
                            json={"name": "x", "source": "/x", "task": "embed"}), 403)


def test_oversized_bodies_are_refused(gateway: str) -> None:
    h = auth(user())
    big = {"task": "embed", "model": "tiny-encoder", "inputs": ["x" * 1000] * 300}
    assert_error(httpx.post(f"{gateway}/v1/jobs", headers=h, json=big), 413, "payload_too_large")

    def chunks() -> Any:  # no Content-Length: counted while read
        for _ in range(300):
            yield b"x" * 1000

    r = httpx.post(f"{gateway}/v1/jobs", headers={**h, "Content-Type": "application/json"}, content=chunks())
    assert_error(r, 413, "payload_too_large")


def test_another_users_job_is_not_found(gateway: str, models: dict[str, str]) -> None:
    alice, mallory = auth(user()), auth(user())
    r = httpx.post(f"{gateway}/v1/jobs", headers=alice, timeout=60,
                   json={"task": "embed", "model": "tiny-encoder", "inputs": TEXTS[:2]})
    job_id = r.json()["id"]
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/results"), ("GET", "/events")):
        assert_error(httpx.request(method, f"{gateway}/v1/jobs/{job_id}{path}", headers=mallory), 404, "not_found")
    assert get_json(f"{gateway}/v1/jobs", mallory)["total"] == 0
    assert get_json(f"{gateway}/v1/jobs/{job_id}", alice)["id"] == job_id
    everyone = get_json(f"{gateway}/admin/jobs?limit=500", auth("root", "admin"))
    assert job_id in [j["id"] for j in everyone["jobs"]]


# --- models, health, metrics, openapi

def test_models(gateway: str, models: dict[str, str], admin: dict[str, str], tmp_path: Path) -> None:
    h = auth(user())
    names = {m["name"]: m for m in get_json(f"{gateway}/v1/models?format=bitinglip", h)["models"]}
    assert {m["id"] for m in get_json(f"{gateway}/v1/models", h)["data"]} >= set(names)  # OpenAI's list shape
    assert names["all-MiniLM-L6-v2"]["source"] == "package"
    assert names["tiny-encoder"]["source"] == "registered" and "path" not in names["tiny-encoder"]
    assert names["tiny-encoder"]["version"] == "1" and len(names["tiny-encoder"]["sha256"]) == 64
    assert get_json(f"{gateway}/v1/models/tiny-encoder", h)["name"] == "tiny-encoder"
    assert_error(httpx.get(f"{gateway}/v1/models/nope", headers=h), 404)
    r = httpx.post(f"{gateway}/admin/models", headers=admin, timeout=60,
                   json={"name": "ghost", "source": "/nonexistent/model", "task": "embed"})
    assert "/nonexistent/model" in assert_error(r, 422)["message"]
    fake = tmp_path / "fake.gguf"  # a .gguf source goes to the GGUF reader (a real one: tests/models/test_gguf_model.py)
    fake.write_bytes(b"not a gguf file")
    r = httpx.post(f"{gateway}/admin/models", headers=admin, timeout=60,
                   json={"name": "fake", "source": str(fake), "task": "generate"})
    assert "cannot read this GGUF file" in assert_error(r, 422, "model_source_failed")["message"]
    r = httpx.post(f"{gateway}/admin/models", headers=admin, timeout=60,
                   json={"name": "../etc", "source": models["tiny-encoder"], "task": "embed"})
    assert_error(r, 422)
    r = httpx.post(f"{gateway}/admin/models", headers=admin, timeout=60,
                   json={"name": "enc-copy", "source": models["tiny-encoder"], "task": "embed"})
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{gateway}/admin/models/enc-copy", headers=admin).status_code == 204
    assert_error(httpx.delete(f"{gateway}/admin/models/enc-copy", headers=admin), 404)


def test_health(gateway: str) -> None:
    r = httpx.get(f"{gateway}/health", timeout=30)
    assert r.status_code == 200, r.text
    components = r.json()["components"]
    assert set(components) == {"gateway", "models", "tasks", "cluster"}
    assert components["cluster"]["workers"] == 2 and components["tasks"]["redis"] == "reachable"
    assert isinstance(components["models"]["registry_size"], int)
    assert httpx.get(f"{gateway}/health/ready").status_code == 200


def test_metrics_and_openapi(gateway: str, models: dict[str, str]) -> None:
    h = auth(user())
    httpx.get(f"{gateway}/v1/jobs", headers=h)
    assert_error(httpx.get(f"{gateway}/metrics"), 401)
    text = httpx.get(f"{gateway}/metrics", headers=h).text
    assert 'bitinglip_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert 'bitinglip_http_request_duration_seconds_bucket{le="+Inf",route="/v1/jobs"}' in text
    assert 'bitinglip_jobs{state="queued"}' in text
    spec = get_json(f"{gateway}/openapi.json", h)
    assert spec["openapi"].startswith("3.") and "/v1/jobs/{job_id}/events" in spec["paths"]
    assert_error(httpx.get(f"{gateway}/openapi.json"), 401)


def test_unknown_route_has_an_error_body(gateway: str) -> None:
    assert_error(httpx.get(f"{gateway}/v2/nothing"), 404, "not_found")
    r = httpx.get(f"{gateway}/v1/jobs/x", headers={**auth(user()), "X-Request-ID": "trace-123"})
    assert assert_error(r, 404)["request_id"] == "trace-123"
