"""A cancelled OpenAI batch resumed through its job (``POST
/v1/jobs/{id}/resume``; OpenAI has no resume of its own): the batch follows
its job again to ``completed``, with every ``custom_id`` exactly once; a
chat batch resumes as an embeddings batch does; a resume that cannot go
ahead leaves the job and the batch as they were.  On the session's live
gateway, Redis and cluster, with the official ``openai`` client."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from gwtools import auth, get_json, new_user
from test_openai import (
    BATCH_DEADLINE_S,
    MODEL,
    by_custom_id,
    client,
    finished,
    jsonl,
    line,
    register_chat_model,
    upload,
)

openai = pytest.importorskip("openai", reason="the official openai client is not installed (the dev extra pins it)")


def resume(gateway: str, sub: str, batch_id: str, patience_s: float = 180) -> httpx.Response:
    """Resume, retrying as a 503 says ("still leaving the cluster; retry shortly"): a cancelled partition
    stops at its next micro-batch, and one still loading its model (a chat engine, on a loaded machine)
    stops only after the gateway's 30 s wait."""
    deadline = time.time() + patience_s
    while True:
        r = httpx.post(f"{gateway}/v1/jobs/{batch_id.removeprefix('batch_')}/resume", headers=auth(sub), timeout=120)
        if r.status_code != 503 or "retry shortly" not in r.text or time.time() > deadline:
            return r
        time.sleep(float(r.headers["Retry-After"]))


def cancelled(oai: Any, batch_id: str) -> Any:
    done = finished(oai, batch_id)
    assert done.status == "cancelled", done
    return done


def every_line_once(oai: Any, done: Any, ids: list[str]) -> None:
    assert done.status == "completed", done
    out, err = by_custom_id(jsonl(oai, done.output_file_id)), by_custom_id(jsonl(oai, done.error_file_id))
    assert sorted(out) == sorted(ids) and not err, err
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (len(ids),
                                                                                                     len(ids), 0)
    assert done.completed_at and done.in_progress_at and done.finalizing_at and done.cancelled_at is None


def test_a_batch_cancelled_mid_way_resumes_to_completed(gateway: str, models: dict[str, str]) -> None:
    sub = new_user("oai-resume")
    oai = client(gateway, sub)
    # cancelled once a tenth shows as done: progress reaches the gateway in steps, and on a fast machine a
    # fifth seen was once every row run (the cancel then found nothing left to stop)
    n = 8000
    ids = [f"r{i}" for i in range(n)]
    lines = [line(c, {"model": MODEL, "input": f"resume me {c} " + "word " * 40}) for c in ids]
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/embeddings",
                               completion_window="24h")
    deadline = time.time() + BATCH_DEADLINE_S
    while (seen := oai.batches.retrieve(batch.id)).request_counts.completed < n // 10:
        assert seen.status in ("validating", "in_progress"), seen
        assert time.time() < deadline, f"the batch got no further than {seen.request_counts} in {BATCH_DEADLINE_S}s"
        time.sleep(0.05)
    oai.batches.cancel(batch.id)
    stopped = cancelled(oai, batch.id)
    assert stopped.request_counts.completed < n, "the cancel landed after every line had run"

    r = resume(gateway, sub, batch.id)
    assert r.status_code == 202, r.text
    again = oai.batches.retrieve(batch.id)
    # in progress again: the earlier end's files and stamps are gone until the new one
    assert again.status in ("in_progress", "finalizing", "completed"), again
    if again.status == "in_progress":
        assert (again.output_file_id, again.error_file_id, again.cancelled_at, again.cancelling_at) == (None,) * 4
    every_line_once(oai, finished(oai, batch.id), ids)
    assert batch.id in [b.id for b in oai.batches.list() if b.status == "completed"]


@pytest.fixture(scope="module")
def chat_model(gateway: str, admin: dict[str, str], models_dir: Path) -> str:
    return register_chat_model(gateway, admin, models_dir / "tiny-llama-resume", "tiny-llama-resume")


def test_a_cancelled_chat_batch_resumes_as_an_embeddings_batch_does(gateway: str, chat_model: str) -> None:
    sub = new_user("oai-chat-resume")
    oai = client(gateway, sub)
    ids = [f"chat-{i}" for i in range(8)]
    bodies = [{"model": chat_model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4,
               "temperature": 0.7, "seed": i, "stop": ["zz"]} for i in range(8)]
    lines = [line(c, body, url="/v1/chat/completions") for c, body in zip(ids, bodies)]
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    oai.batches.cancel(batch.id)
    cancelled(oai, batch.id)
    r = resume(gateway, sub, batch.id)
    # the same file makes the same frame, so the same fingerprint: no "fingerprint differs"
    assert r.status_code == 202, r.text
    done = finished(oai, batch.id)
    every_line_once(oai, done, ids)
    body = by_custom_id(jsonl(oai, done.output_file_id))["chat-3"]["response"]["body"]
    assert body["object"] == "chat.completion" and 0 < body["usage"]["completion_tokens"] <= 4
    job = get_json(f"{gateway}/v1/jobs/{batch.id.removeprefix('batch_')}", auth(sub))
    assert job["state"] == "succeeded"
    assert httpx.get(f"{gateway}/v1/jobs/{job['id']}/results", headers=auth(sub), timeout=60).status_code == 200


def test_a_resume_that_cannot_go_ahead_changes_nothing(gateway: str, gw_settings: Any,
                                                      models: dict[str, str]) -> None:
    from bitinglip.gateway.openai.batchfile import INPUT
    from bitinglip.gateway.rebuild import REST_RECORD

    sub = new_user("oai-resume-refused")
    oai = client(gateway, sub)
    ids = [f"x{i}" for i in range(300)]
    batch = oai.batches.create(input_file_id=upload(oai, [line(c, {"model": MODEL, "input": c}) for c in ids]).id,
                               endpoint="/v1/embeddings", completion_window="24h")
    oai.batches.cancel(batch.id)
    before = cancelled(oai, batch.id)
    job_id = batch.id.removeprefix("batch_")
    job = get_json(f"{gateway}/v1/jobs/{job_id}", auth(sub))
    folder = Path(gw_settings.results_dir) / job_id

    def unchanged() -> None:
        assert get_json(f"{gateway}/v1/jobs/{job_id}", auth(sub)) == job
        assert oai.batches.retrieve(batch.id) == before

    # the batch's input is not the one its job ran on: refused before anything moves
    ran = os.stat(folder / INPUT)
    os.utime(folder / INPUT, ns=(ran.st_atime_ns, ran.st_mtime_ns + 10**9))
    r = resume(gateway, sub, batch.id)
    assert r.status_code == 409 and "inputs changed" in r.json()["error"]["message"], r.text
    unchanged()
    os.utime(folder / INPUT, ns=(ran.st_atime_ns, ran.st_mtime_ns))
    # the hand-over fails (the job's record cannot be written): the job and the batch end again as they were
    (folder / REST_RECORD).unlink()
    (folder / REST_RECORD).mkdir()
    (folder / REST_RECORD / "in-the-way").write_text("x")
    r = resume(gateway, sub, batch.id)
    assert r.status_code == 507 and r.json()["error"]["code"] == "output_write_failed", r.text
    unchanged()
    shutil.rmtree(folder / REST_RECORD)
    assert resume(gateway, sub, batch.id).status_code == 202
    every_line_once(oai, finished(oai, batch.id), ids)
