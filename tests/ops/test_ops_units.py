"""Fast tests of the ops bookkeeping, the metrics text and the JSON logs."""

from __future__ import annotations

import json
import logging
import time

import pytest

from bitinglip.logs import REQUEST_ID, JsonFormatter
from bitinglip.platform.ops.jobs_page import page as render_page
from bitinglip.platform.ops.ops_plugin import OpsPlugin
from bitinglip.platform.ops.opsmetrics import FINISHED_KEPT, Collector, Figures

JOB = "a" * 32


def _run_job(figures: Figures, job: str = JOB, parts: int = 2, manifest: bool = True) -> None:
    for i in range(parts):
        figures.on_key(job, str(i), "waiting")
    if manifest:
        figures.on_key(job, "manifest", "waiting")
    figures.on_key(job, "0", "processing")
    figures.on_summary({"job": job, "task": "embed", "model": "m", "phase": "start"})
    figures.on_progress({"job": job, "part": 0, "done": 5, "total": 10})
    for i in range(parts):
        figures.on_progress({"job": job, "part": i, "done": 10, "total": 10})
        figures.on_summary({"job": job, "part": i, "task": "embed", "model": "m", "phase": "done", "rows": 9,
                            "errors": 1, "tokens": 100 * (i + 1), "batches": 2, "oom_splits": i,
                            "padding_ratio": 1.5 if i else 1.0, "rows_reused": 4 * i})
        figures.on_key(job, str(i), "memory")


def test_a_job_from_queued_to_succeeded() -> None:
    figures = Figures()
    figures.on_key(JOB, "0", "waiting")
    figures.on_key(JOB, "1", "waiting")
    figures.on_progress({"job": JOB, "part": 0, "done": 4, "total": 10})
    view = figures.jobs[JOB].view()
    assert view["state"] == "running" and view["rows_total"] == 20  # the unseen partition is estimated
    assert view["rows_total_estimated"] is True  # ... and says so (the Jobs page shows ~20)
    assert "4/<span title=\"an estimate until every partition has started\">~20</span>" in render_page(
        {"jobs": [view], "workers": []})
    assert view["task"] == "unknown"
    _run_job(figures)
    assert figures.jobs[JOB].state == "running"  # the manifest is still to come
    figures.on_key(JOB, "manifest", "memory")
    view = figures.jobs[JOB].view()
    assert view["rows_total_estimated"] is False and view["rows_total"] == 20
    assert (view["state"], view["rows"], view["rows_in_error"], view["tokens"], view["oom_splits"]) == (
        "succeeded", 18, 2, 300, 1)
    assert view["rows_reused"] == 4 and '<td class="reused">4</td>' in render_page({"jobs": [view], "workers": []})
    assert figures.jobs[JOB].padding_ratio == pytest.approx((1.0 * 100 + 1.5 * 200) / 300)
    assert figures.finished["succeeded"] == 1
    assert figures.by_model[("embed", "m")]["rows"] == 18


def test_failed_and_cancelled_jobs() -> None:
    figures = Figures()
    figures.on_key("f" * 32, "0", "processing")
    figures.on_key("f" * 32, "0", "erred")
    figures.on_key("c" * 32, "0", "waiting")
    figures.on_key("c" * 32, "0", "forgotten")
    assert figures.jobs["f" * 32].state == "failed" and figures.jobs["c" * 32].state == "cancelled"
    figures.on_key("f" * 32, "0", "memory")  # nothing moves a finished job
    assert figures.jobs["f" * 32].state == "failed"


def test_finished_jobs_are_capped() -> None:
    figures = Figures()
    for n in range(FINISHED_KEPT + 5):
        _run_job(figures, f"{n:032x}", parts=1, manifest=False)
    assert len(figures.jobs) == FINISHED_KEPT
    assert figures.finished["succeeded"] == FINISHED_KEPT + 5


def test_text_and_collector_agree_and_parse() -> None:
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client is not installed")
    from prometheus_client import CollectorRegistry, generate_latest

    figures = Figures()
    _run_job(figures)
    figures.on_key(JOB, "manifest", "memory")  # finished: no figure depends on the clock any more
    engine = {"task": "generate", "model": "llm", "dtype": "float32", "bytes": 2e9, "engine": "vllm",
              "kv_cache_bytes": 2.0**30, "kv_cache_usage": 0.25, "running": 3.0}
    figures.on_worker("tcp://w:1", {"models": [{"task": "embed", "model": 'm"q', "dtype": "float32", "bytes": 5e7,
                                                "matmul_precision": "highest", "token_budget": 2048,
                                                "torch_threads": 2}, engine],
                                    "load_seconds": {"m": 1.25}, "load_counts": {"m": 1},
                                    "gpu": {"used": 10, "total": 100}})
    own_page = OpsPlugin()
    own_page.figures = figures
    ours = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in parser.text_string_to_metric_families(own_page.metrics_text()) for s in fam.samples}
    registry = CollectorRegistry()  # as on the scheduler's own /metrics, beside Dask's series
    registry.register(Collector(figures))  # type: ignore[arg-type]
    theirs = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in parser.text_string_to_metric_families(generate_latest(registry).decode())
              for s in fam.samples if not s.name.endswith("_created")}
    assert ours == theirs
    assert {name for name, _ in ours} >= {fam.name for fam in figures.families()}  # every family has a series
    labels = (("job", JOB), ("model", "m"), ("task", "embed"))
    assert ours[("bitinglip_job_rows_total", labels)] == 18
    assert ours[("bitinglip_job_tokens_total", labels)] == 300
    assert ours[("bitinglip_model_resident_bytes",
                 (("dtype", "float32"), ("model", 'm"q'), ("task", "embed"), ("worker", "tcp://w:1")))] == 5e7
    assert ours[("bitinglip_worker_gpu_memory_used_bytes", (("worker", "tcp://w:1"),))] == 10
    on_engine = (("engine", "vllm"), ("model", "llm"), ("worker", "tcp://w:1"))
    assert ours[("bitinglip_model_kv_cache_bytes", on_engine)] == 2.0**30
    assert ours[("bitinglip_model_kv_cache_usage", on_engine)] == 0.25
    assert ours[("bitinglip_model_requests_running", on_engine)] == 3
    # what each worker chose: the embed model's timed precision, the generation model's engine
    assert ours[("bitinglip_model_runtime_info", (("engine", ""), ("matmul_precision", "highest"), ("model", 'm"q'),
                                                  ("task", "embed"), ("token_budget", "2048"),
                                                  ("torch_threads", "2"), ("worker", "tcp://w:1")))] == 1
    assert ours[("bitinglip_model_runtime_info", (("engine", "vllm"), ("matmul_precision", ""), ("model", "llm"),
                                                  ("task", "generate"), ("token_budget", ""),
                                                  ("torch_threads", ""), ("worker", "tcp://w:1")))] == 1
    # the Jobs page names the same choices beside each resident model
    worker = {"name": "w", "address": "tcp://w:1", "resources": {}, "memory_bytes": 0,
              "models": [{"task": "embed", "model": "m", "bytes": 5e7, "matmul_precision": "highest",
                          "token_budget": 2048, "torch_threads": 1}]}
    assert ", highest, budget 2048, 1 thread)" in render_page({"jobs": [], "workers": [worker]})


def test_json_log_lines() -> None:
    record = logging.LogRecord("bitinglip.ops", logging.INFO, __file__, 1, "job %s", ("succeeded",), None)
    record.job_id = JOB
    token = REQUEST_ID.set("req-1")
    try:
        line = JsonFormatter().format(record)
    finally:
        REQUEST_ID.reset(token)
    event = json.loads(line)
    assert "\n" not in line
    assert (event["msg"], event["job_id"], event["request_id"], event["level"]) == ("job succeeded", JOB, "req-1",
                                                                                     "info")


def test_stop_groups_ends_a_whole_process_group() -> None:
    import os
    import subprocess
    import sys

    import psutil

    from bitinglip.platform.cluster.processes import stop_groups

    # a leader that ignores SIGTERM (so SIGKILL must follow) and a child that does not
    code = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        for _ in range(100):  # until the child is there (at most 10 s)
            if len([p for p in psutil.process_iter() if _pgid(p.pid) == leader.pid]) == 2:
                break
            time.sleep(0.1)
        members = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == leader.pid]
        assert len(members) == 2
        stop_groups({"test": leader.pid}, {"test": leader}, grace_s=1.0)
        assert leader.returncode == -9
        assert not [p for p in members if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, 9)
            leader.wait()


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
