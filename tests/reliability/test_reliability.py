"""Failures on purpose, on real clusters. Each test prints its figure:
rows in, rows out, rows in error, duplicates, lost."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
from helpers import kill_processes, start_dask_processes

import bitinglip
from bitinglip import Batch, Loaded, TaskType
from bitinglip.errors import JobTimeoutError, PartitionFailedError
from bitinglip.platform.jobs.sample import sample_corpus

MINILM = "all-MiniLM-L6-v2"


def figure(name: str, rows_in: int, out: pd.DataFrame, errors: pd.DataFrame | None = None,
           expected_ids: list[Any] | None = None, **extra: Any) -> dict[str, int]:
    ids = out["id"].tolist() + ([] if errors is None else errors["id"].tolist())
    expected = set(expected_ids if expected_ids is not None else range(rows_in))
    fig = {"rows_in": rows_in, "rows_out": len(out), "rows_in_error": 0 if errors is None else len(errors),
           "duplicates": len(ids) - len(set(ids)), "lost": len(expected - set(ids))}
    print(f"\nFIGURE {name}: " + ", ".join(f"{k}={v}" for k, v in {**fig, **extra}.items()))
    return fig


def busy_workers(client: Any) -> int:
    """Workers whose threads still run a BitingLip task. The scheduler forgets
    a cancelled task at once; the worker's thread is the truth."""
    running = client.run(lambda dask_worker: [str(k) for k in dask_worker.active_threads.values()])
    return sum(1 for keys in running.values() if any("bitinglip-" in k for k in keys))


def wait_until(predicate: Any, timeout: float = 120, step: float = 0.2) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def own_platform() -> Iterator[bitinglip.Platform]:
    """A cluster of its own: these tests kill its workers."""
    with bitinglip.connect(n_workers=2, dashboard_address=":0", preload=[("embed", MINILM)]) as p:
        yield p


def test_sigkill_a_worker_mid_job(own_platform: bitinglip.Platform, tmp_path: Path) -> None:
    n = 3000
    job = own_platform.submit("embed", model=MINILM, inputs=sample_corpus(n, seed=21), output=tmp_path / "out",
                              partition_rows=250)
    wait_until(lambda: job.rows_done() > 0 and busy_workers(own_platform.client) > 0)
    victim = next(a for a, keys in own_platform.client.run(
        lambda dask_worker: list(dask_worker.active_threads.values())).items() if keys)
    pid = own_platform.client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    out = job.result()
    fig = figure("sigkill-worker", n, out, job.errors(), killed_pid=pid)
    assert fig["duplicates"] == 0 and fig["lost"] == 0 and fig["rows_out"] == n
    assert out["id"].tolist() == list(range(n))


def test_cancel_frees_the_workers_and_marks_output_partial(own_platform: bitinglip.Platform, tmp_path: Path) -> None:
    job = own_platform.submit("embed", model=MINILM, inputs=sample_corpus(6000, seed=22), output=tmp_path / "out",
                              partition_rows=3000)
    wait_until(lambda: job.rows_done() > 0)
    job.cancel()
    seconds = wait_until(lambda: busy_workers(own_platform.client) == 0, timeout=60)
    print(f"\nFIGURE cancel: workers busy for {seconds:.2f}s after cancel, rows done {job.rows_done()} of 6000")
    manifest = pd.read_json(tmp_path / "out" / "_manifest.json", typ="series")
    assert manifest["state"] == "cancelled"
    assert job.status() == "cancelled"


def test_resume_after_cancel_runs_only_what_is_missing(own_platform: bitinglip.Platform, tmp_path: Path) -> None:
    n = 2400
    texts = sample_corpus(n, seed=23)
    job = own_platform.submit("embed", model=MINILM, inputs=texts, output=tmp_path / "out", partition_rows=200)
    wait_until(lambda: sum(f.status == "finished" for f in job.futures) >= 2)
    job.cancel()
    wait_until(lambda: busy_workers(own_platform.client) == 0, timeout=60)
    committed = len(list((tmp_path / "out").glob("part-*.parquet")))
    resumed = job.resume()
    out = resumed.result()
    skipped = sum(1 for s in resumed.summaries() if s.get("skipped"))
    fig = figure("resume-after-cancel", n, out, resumed.errors(), committed_before=committed, skipped=skipped)
    assert fig["duplicates"] == 0 and fig["lost"] == 0
    assert skipped == committed >= 2
    assert out["id"].tolist() == list(range(n))


def test_resubmitting_with_the_same_key_and_output_does_not_redo_work(own_platform: bitinglip.Platform,
                                                                      tmp_path: Path) -> None:
    texts = sample_corpus(400, seed=24)
    first = own_platform.submit("embed", model=MINILM, inputs=texts, output=tmp_path / "o", job_id="nightly-1",
                                partition_rows=100)
    first.result()
    again = own_platform.submit("embed", model=MINILM, inputs=texts, output=tmp_path / "o", job_id="nightly-1")
    out = again.result()
    assert all(s.get("skipped") for s in again.summaries())
    assert figure("resubmit", 400, out, again.errors())["duplicates"] == 0
    from bitinglip.errors import OutputConflictError

    with pytest.raises(OutputConflictError, match="another job"):
        own_platform.submit("embed", model=MINILM, inputs=texts[:10], output=tmp_path / "o", job_id="nightly-1")


def test_out_of_memory_splits_the_batch_and_remembers(own_platform: bitinglip.Platform,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    texts = sample_corpus(800, seed=25)
    # float32 products: split batches have other shapes, and bfloat16 kernels (AMX) round by shape; a budget
    # above the injected limit (a worker's timed budget may be below it, and then nothing would split)
    f32 = {"matmul_precision": "highest", "token_budget": 4096}
    want = own_platform.submit("embed", model=MINILM, inputs=texts, **f32).result()
    monkeypatch.setattr(own_platform, "settings", own_platform.settings.with_(fault_oom_above_tokens=1200))
    job = own_platform.submit("embed", model=MINILM, inputs=texts, **f32)
    got = job.result()
    splits = sum(s["oom_splits"] for s in job.summaries())
    again = own_platform.submit("embed", model=MINILM, inputs=texts, **f32)
    again.result()
    splits_again = sum(s["oom_splits"] for s in again.summaries())
    fig = figure("oom", len(texts), got, job.errors(), oom_splits=splits, oom_splits_next_job=splits_again)
    assert splits > 0 and splits_again < splits
    assert fig["lost"] == fig["duplicates"] == 0 and fig["rows_in_error"] == 0
    import numpy as np

    np.testing.assert_allclose(np.stack(got["embedding"]), np.stack(want["embedding"]), atol=1e-5)


class Picky(TaskType):
    """Fails on rows containing BOOM, like a tokenizer choking on one row."""

    name = "picky"
    columns = ("n",)
    load_options = ()
    defaults: ClassVar[dict[str, Any]] = {}

    def load(self, path: str, device: str, options: Any) -> Loaded:
        return Loaded(model=None)

    def predict(self, loaded: Loaded, batch: Batch, options: Any) -> list[dict[str, Any]]:
        if any("BOOM" in t for t in batch.texts):
            raise ValueError("cannot digest BOOM")
        return [{"n": len(t)} for t in batch.texts]


def test_bad_rows_do_not_kill_the_job(own_platform: bitinglip.Platform) -> None:
    own_platform.register_task(Picky())
    texts: list[Any] = [f"row {i}" for i in range(1000)]
    bad = {13: None, 100: 7, 250: "BOOM here", 251: "", 777: "and BOOM", 999: 3.5}
    for i, v in bad.items():
        texts[i] = v
    job = own_platform.submit("picky", model=MINILM, inputs=texts, partition_rows=200)
    out, errors = job.result(), job.errors()
    fig = figure("bad-rows", len(texts), out, errors)
    assert fig["lost"] == fig["duplicates"] == 0
    assert sorted(errors["id"]) == [13, 100, 250, 777, 999]
    assert "cannot digest BOOM" in errors.set_index("id").loc[250, "reason"]
    assert out.set_index("id").loc[251, "n"] == 0  # an empty text is not an error for this task


class Flaky(TaskType):
    """Fails the first time each worker process runs it."""

    name = "flaky"
    columns = ("ok",)
    load_options = ()
    defaults: ClassVar[dict[str, Any]] = {}

    def load(self, path: str, device: str, options: Any) -> Loaded:
        return Loaded(model=None)

    def predict(self, loaded: Loaded, batch: Batch, options: Any) -> list[dict[str, Any]]:
        import builtins

        if not getattr(builtins, "_bitinglip_flaky_seen", False):
            builtins._bitinglip_flaky_seen = True  # type: ignore[attr-defined]
            raise ConnectionError("transient failure")
        return [{"ok": True} for _ in batch.texts]


def test_retries_keep_the_reason_of_each_failure(own_platform: bitinglip.Platform) -> None:
    own_platform.register_task(Flaky())
    job = own_platform.submit("flaky", model=MINILM, inputs=[f"r{i}" for i in range(40)], retries=0,
                              partition_rows=64, fail_fast=True)
    with pytest.raises(PartitionFailedError, match="transient failure"):
        job.result()
    job = own_platform.submit("flaky", model=MINILM, inputs=[f"r{i}" for i in range(40)], retries=2,
                              partition_rows=64, fail_fast=True)
    assert len(job.result()) == 40


class Slow(TaskType):
    name = "slow"
    columns = ("ok",)
    load_options = ()
    defaults: ClassVar[dict[str, Any]] = {}

    def load(self, path: str, device: str, options: Any) -> Loaded:
        return Loaded(model=None)

    def tokenize(self, loaded: Loaded, texts: list[str], options: Any) -> tuple[list[list[int]], list[bool]]:
        return [[0] * 4096 for _ in texts], [False] * len(texts)  # one row per micro-batch

    def predict(self, loaded: Loaded, batch: Batch, options: Any) -> list[dict[str, Any]]:
        time.sleep(0.2)
        return [{"ok": True} for _ in batch.texts]


def test_a_job_past_its_timeout_stops(own_platform: bitinglip.Platform) -> None:
    own_platform.register_task(Slow())
    job = own_platform.submit("slow", model=MINILM, inputs=[f"r{i}" for i in range(200)], timeout=2)
    with pytest.raises(JobTimeoutError, match="timeout"):
        job.result()
    seconds = wait_until(lambda: busy_workers(own_platform.client) == 0, timeout=30)
    print(f"\nFIGURE timeout: workers free {seconds:.2f}s after the job failed")


DETACH_AND_DIE = """
import os, sys
import bitinglip
platform = bitinglip.connect(sys.argv[1], timeout=60)
job = platform.submit("embed", model=sys.argv[3], inputs=[f"row {i} of a detached job" for i in range(600)],
                      output=sys.argv[2], partition_rows=100)
platform.detach(job)
os._exit(0)  # like SIGKILL: no close, no flush of the client's batched messages
"""


def test_a_detached_job_outlives_its_client(own_platform: bitinglip.Platform, tmp_path: Path) -> None:
    """The gateway's promise: once ``detach`` returns (and the 202 goes out),
    the client's process may die at once and the job still runs to its end."""
    address = own_platform.client.scheduler.address
    for attempt in range(3):
        out_dir = tmp_path / f"out{attempt}"
        subprocess.run([sys.executable, "-c", DETACH_AND_DIE, address, str(out_dir), MINILM], check=True, timeout=120)
        wait_until(lambda out_dir=out_dir: (out_dir / "_manifest.json").exists(), timeout=120)
        manifest = pd.read_json(out_dir / "_manifest.json", typ="series")
        assert manifest["state"] == "succeeded", manifest
        assert int(manifest["rows_out"]) == 600
        assert len(list(out_dir.glob("part-*.parquet"))) == 6


@pytest.mark.cluster
def test_scheduler_killed_then_resumed_on_a_new_cluster(tmp_path: Path) -> None:
    n = 2000
    src = tmp_path / "in.parquet"
    pd.DataFrame({"id": [f"d{i}" for i in range(n)], "text": sample_corpus(n, seed=26)}).to_parquet(src)
    out_dir = tmp_path / "out"
    address, procs = start_dask_processes(tmp_path, "a")
    try:
        platform = bitinglip.connect(address, timeout=60)
        platform.client.wait_for_workers(2, timeout=120)
        job = platform.submit("embed", model=MINILM, inputs=str(src), output=out_dir, partition_rows=200)
        wait_until(lambda: len(list(out_dir.glob("part-*.parquet"))) >= 2, timeout=300)
    finally:
        kill_processes(procs)  # scheduler and workers die at once, mid-job
    committed = len(list(out_dir.glob("part-*.parquet")))
    with contextlib.suppress(Exception):  # its scheduler is gone
        platform.client.close(timeout=5)
    address, procs = start_dask_processes(tmp_path, "b")
    try:
        with bitinglip.connect(address, timeout=60) as fresh:
            fresh.client.wait_for_workers(2, timeout=120)
            resumed = fresh.resume(out_dir)
            out = resumed.result()
            skipped = sum(1 for s in resumed.summaries() if s.get("skipped"))
    finally:
        kill_processes(procs)
    fig = figure("scheduler-killed-resume", n, out, None, expected_ids=[f"d{i}" for i in range(n)],
                 committed_before=committed, skipped=skipped, job=job.id)
    assert fig["duplicates"] == 0 and fig["lost"] == 0 and skipped >= committed >= 2
    assert out["id"].tolist() == [f"d{i}" for i in range(n)]
