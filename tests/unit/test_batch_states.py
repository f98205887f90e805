"""An OpenAI batch's status and timestamps through its life, from its record
and its job's, as the official client's ``Batch`` type reads them: validating,
in_progress, finalizing, completed; cancelling, cancelled; failed; and back
in progress when its job is resumed."""

from __future__ import annotations

from typing import Any

import pytest

from bitinglip.gateway.openai.batches import check_failed, due, new_record, reopened, status, view

openai = pytest.importorskip("openai", reason="the official openai client is not installed (the dev extra pins it)")

BODY = {"endpoint": "/v1/embeddings", "input_file_id": "file-abc", "completion_window": "24h"}


def batch(record: dict[str, Any], job: dict[str, Any] | None) -> Any:
    return openai.types.Batch.model_validate(view(record, job))


def stamps(b: Any) -> dict[str, int | None]:
    return {name: getattr(b, name) for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                                                "cancelling_at", "cancelled_at", "expired_at")}


def test_validating_in_progress_finalizing_completed() -> None:
    record = {**new_record("j1", "ann", BODY, now=1000.0), "lines": 4, "rows": 4, "rejected": 0}
    job = {"id": "j1", "state": "queued", "created_at": 1000.0}
    # checked and being handed over: the cluster does not hold the job yet (no ``parts``)
    b = batch(record, job)
    assert b.status == "validating" and set(stamps(b).values()) == {None}
    record["in_progress_at"] = 1002.0
    job.update(parts=2, rows_total=4)
    b = batch(record, job)
    assert b.status == "in_progress" and b.in_progress_at == 1002 and b.finalizing_at is None
    job.update(state="running", rows_done=2)
    assert batch(record, job).request_counts.completed == 2
    job.update(state="succeeded", rows_done=4, finished_at=1010.0)
    assert due(record, job, 1010.5)
    record["finalizing_at"] = 1011.0  # a finalization under way: what another reader sees
    b = batch(record, job)
    assert b.status == "finalizing" and b.finalizing_at == 1011 and b.completed_at is None
    assert b.usage is None  # counted when the files are written
    record.update(final_status="completed", finalized_at=1012.0, completed=4, failed=0, output_file_id="file-j1-o",
                  usage={"input_tokens": 40, "output_tokens": 7})
    b = batch(record, job)
    assert b.status == "completed" and not due(record, job, 2000.0)
    assert (b.usage.input_tokens, b.usage.output_tokens, b.usage.total_tokens) == (40, 7, 47)
    assert "usage" not in reopened(record)  # a resume counts again
    assert stamps(b) == {"in_progress_at": 1002, "finalizing_at": 1011, "completed_at": 1012, "failed_at": None,
                         "cancelling_at": None, "cancelled_at": None, "expired_at": None}


def test_cancelling_cancelled_then_reopened_by_a_resume() -> None:
    record = {**new_record("j2", "ann", BODY, now=1000.0), "lines": 4, "rows": 4, "rejected": 0,
              "in_progress_at": 1001.0, "cancelled_at": 1005.0}
    job = {"id": "j2", "state": "cancelled", "parts": 2, "finished_at": 1005.0}
    b = batch(record, job)
    assert b.status == "cancelling" and b.cancelling_at == 1005 and b.cancelled_at is None
    record.update(final_status="cancelled", finalizing_at=1008.0, finalized_at=1009.0, completed=1, failed=3,
                  output_file_id="file-j2-output", error_file_id="file-j2-errors")
    b = batch(record, job)
    assert (b.status, b.cancelling_at, b.cancelled_at, b.finalizing_at) == ("cancelled", 1005, 1009, None)
    # the job resumes: the batch is in progress again, without its earlier end
    again = reopened(record)
    job.update(state="queued", resumed_at=1020.0)
    del job["finished_at"]
    b = batch(again, job)
    assert b.status == "in_progress" and b.in_progress_at == 1001
    assert (b.output_file_id, b.error_file_id, b.cancelling_at, b.cancelled_at, b.completed_at) == (None,) * 5
    job.update(state="succeeded", finished_at=1030.0, rows_done=4)
    assert due(again, job, 1030.0) and status(again, job) == "finalizing"


def test_a_failed_check_and_a_failed_job() -> None:
    record = {**new_record("j3", "ann", BODY, now=1000.0), "lines": 2, "final_status": "failed", "finalized_at": 1001.0,
              "errors": [{"code": "invalid_json_line", "message": "line 2: ...", "line": 2, "param": None}]}
    b = batch(record, {"id": "j3", "state": "failed"})
    assert b.status == "failed" and b.failed_at == 1001 and b.in_progress_at is None and check_failed(record)
    ran = {**new_record("j4", "ann", BODY, now=1000.0), "lines": 2, "in_progress_at": 1001.0, "final_status": "failed",
           "finalized_at": 1009.0, "errors": [{"code": "job_failed", "message": "boom", "line": None, "param": None}]}
    b = batch(ran, {"id": "j4", "state": "failed", "parts": 1, "finished_at": 1008.0})
    assert (b.status, b.in_progress_at, b.failed_at) == ("failed", 1001, 1009) and not check_failed(ran)
    assert "errors" not in reopened(ran)  # its job may resume; a failed check may not
