"""The one vocabulary of a job: its key format and parser, the id rule, rate and ETA."""

from __future__ import annotations

import pytest

from bitinglip.platform.jobs import jobstore
from bitinglip.platform.jobs.vocabulary import (
    JOB_ID,
    MANIFEST_PART,
    STATES,
    TERMINAL,
    TRANSITIONS,
    JobState,
    job_keys,
    new_job_id,
    parse_task_key,
    rate_and_eta,
    task_key,
)


@pytest.mark.parametrize("job", ["0" * 32, new_job_id(), "nightly-2026-12-01", "a.b_c-d", "x-5", "j-manifest",
                                 "A" * 128])
@pytest.mark.parametrize("part", [0, 7, 123456, MANIFEST_PART])
def test_parse_task_key_reads_back_what_task_key_wrote(job: str, part: int | str) -> None:
    assert parse_task_key(task_key(job, part)) == (job, part)


@pytest.mark.parametrize("key", ["bitinglip-cancel-abc", "bitinglip--0", "bitinglip-_x-0", "bitinglip-.x-0",
                                 "bitinglip-x-", "bitinglip-x-1a", "bitinglip-x-manifests", "other-x-0",
                                 "bitinglip-" + "a" * 129 + "-0", "bitinglip-a b-0", ("bitinglip-x", 0), 3, None])
def test_parse_task_key_refuses_other_keys(key: object) -> None:
    assert parse_task_key(key) is None


def test_job_keys_and_ids() -> None:
    assert job_keys("j", 2) == ["bitinglip-j-0", "bitinglip-j-1", "bitinglip-j-manifest"]
    assert job_keys("j", 2, manifest=False) == ["bitinglip-j-0", "bitinglip-j-1"]
    job_id = new_job_id()
    assert JOB_ID.fullmatch(job_id) and len(job_id) == 32 and job_id != new_job_id()
    assert not JOB_ID.fullmatch("-x") and not JOB_ID.fullmatch("a" * 129) and not JOB_ID.fullmatch("")


def test_states_and_transitions_agree() -> None:
    assert STATES == tuple(s.value for s in JobState) and set(TRANSITIONS) == set(STATES)
    assert all(TRANSITIONS[s] == () for s in TERMINAL)  # finished is final (a resume reopens explicitly)
    assert all(nxt in STATES for nexts in TRANSITIONS.values() for nxt in nexts)


def test_job_store_scripts_carry_the_vocabulary_states() -> None:
    for script in (jobstore._TRANSITION, jobstore._RESTORE, jobstore._REOPEN):
        assert "{STATES}" not in script and "{TERMINAL}" not in script and "{QUEUED}" not in script
        assert "{" + ", ".join(f"'{s}'" for s in STATES) + "}" in script
    assert all(f"['{s}'] = true" in jobstore._TRANSITION for s in TERMINAL)


def test_rate_and_eta() -> None:
    # 50 rows in 10 s of 150: 5 rows/s, 20 s left
    assert rate_and_eta(50, 150, 100.0, 110.0, "running") == (5.0, 20.0)
    assert rate_and_eta(150, 150, 100.0, 110.0, "succeeded") == (15.0, 0.0)
    # no rows, no start, no total, or a state without an ETA: none
    assert rate_and_eta(0, 150, 100.0, 110.0, "running") == (0.0, None)
    assert rate_and_eta(50, 150, None, 110.0, "running") == (0.0, None)
    assert rate_and_eta(50, None, 100.0, 110.0, "running") == (5.0, None)
    assert rate_and_eta(50, 150, 100.0, 110.0, "failed") == (5.0, None)
    assert rate_and_eta(50, 150, 100.0, 110.0, "queued") == (5.0, None)
    # a client's own job: parts may wait for a worker while others ran
    assert rate_and_eta(50, 150, 100.0, 110.0, "queued", eta_while=("queued", "running")) == (5.0, 20.0)
    # never a negative ETA, never a division by zero
    assert rate_and_eta(200, 150, 100.0, 110.0, "running") == (20.0, 0.0)
    rate, eta = rate_and_eta(1, 10, 100.0, 100.0, "running")
    assert rate > 0 and eta is not None and eta >= 0
