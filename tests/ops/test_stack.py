"""`bitinglip up` end to end: real redis-server, scheduler, worker and
gateway processes; a REST job; the metrics it leaves; the Jobs page in
headless Chromium; JSON logs; and `bitinglip down` leaving no process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from helpers import free_port

from bitinglip.platform.cluster.processes import members

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
MODEL = "all-MiniLM-L6-v2"


def _wait(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
          log: Path | None = None) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"`bitinglip up` exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what} within {timeout}s")


def _stack_pids(state: dict[str, Any]) -> set[int]:
    groups = set(state["groups"].values())
    return {state["up_pid"], *(pid for group in groups for pid in members(group))}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("stack")
    ports = {name: free_port() for name in ("redis", "scheduler", "dashboard", "gateway")}
    env = {**os.environ, "MODEL_CACHE_DIR": str(run_dir / "models"), "BITINGLIP_RESULTS_DIR": str(run_dir / "results"),
           "ENVIRONMENT": "test"}
    for name in ("REDIS_URL", "BITINGLIP_SCHEDULER", "MAX_WORKERS"):
        env.pop(name, None)
    env["BITINGLIP_JWT_SECRET"] = "a-secret-the-user-exported-before-up"  # `bitinglip token` signs with it too
    log = run_dir / "up.out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bitinglip", "up", "--run-dir", str(run_dir), "--workers", "1", "--log-format", "json",
         "--redis-port", str(ports["redis"]), "--scheduler-port", str(ports["scheduler"]),
         "--dashboard-port", str(ports["dashboard"]), "--gateway-port", str(ports["gateway"])],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    state_file = run_dir / "stack.json"

    def ready() -> dict[str, Any] | None:
        if not state_file.exists():
            return None
        state = json.loads(state_file.read_text())
        return state if state.get("token") else None

    state = _wait(ready, 240, "the stack was not up", proc, log)
    state["pids"] = _stack_pids(state)
    state.update(run_dir=run_dir, proc=proc, log=log, env=env,
                 headers={"Authorization": f"Bearer {state['token']}"})
    try:
        yield state
    finally:  # the last test stops it; this only cleans up after a failure
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in state["pids"]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _submit(stack: dict[str, Any], texts: list[str], request_id: str | None = None) -> str:
    headers = {**stack["headers"], **({"X-Request-ID": request_id} if request_id else {})}
    r = httpx.post(f"{stack['urls']['gateway']}/v1/jobs", headers=headers, timeout=60,
                   json={"task": "embed", "model": MODEL, "inputs": texts})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _finished(stack: dict[str, Any], job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = httpx.get(f"{stack['urls']['gateway']}/v1/jobs/{job_id}", headers=stack["headers"], timeout=30).json()
        return job if job["state"] in ("succeeded", "failed", "cancelled") else None

    return _wait(done, 180, f"job {job_id} did not finish")  # type: ignore[no-any-return]


def _metric(text: str, name: str, job_id: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'job="{job_id}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for job {job_id} in:\n{text[:2000]}")


def test_health_reports_every_component(stack: dict[str, Any]) -> None:
    r = httpx.get(f"{stack['urls']['gateway']}/health", timeout=30)
    assert r.status_code == 200, r.text
    parts = r.json()["components"]
    assert parts["tasks"]["redis"] == "reachable"
    assert parts["cluster"]["scheduler"] == stack["urls"]["scheduler"]
    assert parts["cluster"]["workers"] == 1
    assert {p.name() for p in map(psutil.Process, stack["groups"].values())} >= {"redis-server"}


def test_bitinglip_token_in_another_shell_signs_with_the_running_stacks_secret(stack: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    other_shell = {k: v for k, v in stack["env"].items() if k != "BITINGLIP_JWT_SECRET"}  # nothing exported
    run = [sys.executable, "-m", "bitinglip", "token", "--sub", "me", "--scope", "jobs:read"]
    token = subprocess.run([*run, "--run-dir", str(stack["run_dir"])], env=other_shell, capture_output=True,
                           text=True, timeout=60, check=True).stdout.strip()
    r = httpx.get(f"{stack['urls']['gateway']}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert oct((Path(stack["run_dir"]) / "jwt-secret").stat().st_mode & 0o777) == "0o600"
    # no stack there and nothing exported: refused, naming the fix, instead of a token no gateway accepts
    none = subprocess.run([*run, "--run-dir", str(tmp_path)], env=other_shell, capture_output=True, text=True,
                          timeout=60, check=False)
    assert none.returncode == 2 and none.stdout == "" and "BITINGLIP_JWT_SECRET is not set" in none.stderr


def test_tokens_of_bitinglip_token_work_and_the_curl_line_is_whole(stack: dict[str, Any]) -> None:
    token = subprocess.run([sys.executable, "-m", "bitinglip", "token", "--sub", "me", "--scope", "jobs:read"],
                           env=stack["env"], capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    r = httpx.get(f"{stack['urls']['gateway']}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    # the sample curl works as pasted: the whole token, not its first 12 characters
    curl = next(line for line in stack["log"].read_text().splitlines() if "curl -H" in line)
    assert f"Authorization: Bearer {stack['token']}'" in curl


def test_rest_job_finishes_and_metrics_match_it(stack: dict[str, Any]) -> None:
    texts = ["the cat sat on the mat", "a longer sentence about batch inference on dask", "hi", "", "ok"]
    job_id = _submit(stack, texts, request_id="ops-test-request")
    job = _finished(stack, job_id)
    assert job["state"] == "succeeded", job
    rows = httpx.get(f"{stack['urls']['gateway']}/v1/jobs/{job_id}/results", headers=stack["headers"],
                     timeout=30).json()["rows"]
    results = Path(stack["env"]["BITINGLIP_RESULTS_DIR"])
    manifest = json.loads(next(results.rglob(f"*{job_id}*/_manifest.json")).read_text())
    parts = manifest["partitions"]
    assert manifest["rows_out"] == len(rows)
    assert manifest["rows_out"] + manifest["rows_in_error"] == len(texts)

    dashboard = stack["urls"]["dashboard"]
    expected = {"bitinglip_job_rows_total": manifest["rows_out"],
                "bitinglip_job_rows_in_error_total": manifest["rows_in_error"],
                "bitinglip_job_tokens_total": sum(p["tokens"] for p in parts),
                "bitinglip_job_batches_total": sum(p["batches"] for p in parts),
                "bitinglip_job_oom_splits_total": sum(p["oom_splits"] for p in parts)}
    assert expected["bitinglip_job_tokens_total"] > 0

    def scraped() -> str | None:  # the summary event may trail the job's end by a moment
        text = httpx.get(f"{dashboard}/metrics", timeout=30).text
        return text if f'bitinglip_job_rows_total{{job="{job_id}"' in text else None

    text = _wait(scraped, 30, "the scheduler's /metrics had no series for the job")
    own = httpx.get(f"{dashboard}/bitinglip/metrics", timeout=30).text
    for name, value in expected.items():
        assert _metric(text, name, job_id) == value, name
        assert _metric(own, name, job_id) == value, name
    assert _metric(text, "bitinglip_job_running", job_id) == 0
    padding = sum(p["padding_ratio"] * p["tokens"] for p in parts) / expected["bitinglip_job_tokens_total"]
    assert abs(_metric(own, "bitinglip_job_padding_ratio", job_id) - padding) < 1e-6
    resident = [line for line in own.splitlines() if line.startswith("bitinglip_model_resident_bytes{")]
    assert resident and f'model="{MODEL}"' in resident[0] and float(resident[0].rsplit(" ", 1)[1]) > 1e6
    assert re.search(rf'bitinglip_model_load_seconds{{model="{MODEL}",worker="[^"]+"}} [0-9.e-]+', own)
    assert re.search(rf'bitinglip_model_rows_total{{model="{MODEL}",task="embed"}} ', own)

    # the gateway's own /metrics counts the submission
    gw = httpx.get(f"{stack['urls']['gateway']}/metrics", headers=stack["headers"], timeout=30).text
    assert 'bitinglip_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in gw

    # structured logs: one JSON object a line, with the request id and the job id
    gateway_lines = [json.loads(line) for line in (stack["run_dir"] / "gateway.log").read_text().splitlines()]
    assert any(e.get("request_id") == "ops-test-request" and "POST /v1/jobs" in e["msg"] for e in gateway_lines)
    scheduler_lines = [json.loads(line) for line in (stack["run_dir"] / "scheduler.log").read_text().splitlines()]
    assert any(e.get("job_id") == job_id and e.get("event") == "job.succeeded" for e in scheduler_lines)
    # the worker process switches to JSON once its preload runs (the nanny's first lines come before)
    worker_lines = [json.loads(line) for line in (stack["run_dir"] / "workers.log").read_text().splitlines()
                    if line.startswith("{")]
    assert any(e.get("logger") == "distributed.worker" and "Registered to" in e["msg"] for e in worker_lines)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; scripts/install-services.sh does)")
    return exe


def _browse(exe: str, url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--window-size=1400,900", *flags, url],
                          capture_output=True, text=True, timeout=90, check=False)


def test_jobs_page_shows_a_running_job_in_chromium(stack: dict[str, Any]) -> None:
    exe = _chromium()
    from bitinglip.platform.jobs.sample import sample_corpus

    job_id = _submit(stack, sample_corpus(1500))
    dashboard = stack["urls"]["dashboard"]

    def running() -> dict[str, Any] | None:
        jobs = httpx.get(f"{dashboard}/bitinglip/jobs.json", timeout=30).json()["jobs"]
        job = next((j for j in jobs if j["job"] == job_id), None)
        return job if job and job["state"] == "running" and 0 < job["rows_done"] else None

    _wait(running, 120, "the job did not start running")
    page = _browse(exe, f"{dashboard}/bitinglip/jobs", "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    row = re.search(rf'<tr class="job state-(\w+)" data-job="{job_id}">(.*?)</tr>', page.stdout, re.DOTALL)
    assert row is not None, page.stdout[:3000]
    assert row.group(1) in ("running", "succeeded")
    assert f"<td>embed</td><td>{MODEL}</td>" in row.group(2)
    # a total is shown as ~N while it is an estimate from the partitions that started
    done, total = map(int, re.search(r'<span class="rows">(\d+)/(?:<span title="[^"]*">~)?(\d+)',
                                     row.group(2)).groups())
    assert 0 < done <= total == 1500
    assert f"embed:{MODEL}" in page.stdout  # the worker's resident model
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "jobs-page.png"
    shot.unlink(missing_ok=True)
    taken = _browse(exe, f"{dashboard}/bitinglip/jobs", f"--screenshot={shot}")
    assert taken.returncode == 0 and shot.stat().st_size > 1000, taken.stderr[-2000:]
    httpx.delete(f"{stack['urls']['gateway']}/v1/jobs/{job_id}", headers=stack["headers"], timeout=30)
    rest = _finished(stack, job_id)
    assert rest["state"] == "cancelled", rest

    def agrees() -> dict[str, Any] | None:  # the page takes REST's figure once the scheduler sees the cancel
        jobs = httpx.get(f"{dashboard}/bitinglip/jobs.json", timeout=30).json()["jobs"]
        job = next((j for j in jobs if j["job"] == job_id), None)
        return job if job and (job["state"], job["rows_done"]) == ("cancelled", rest["rows_done"]) else None

    _wait(agrees, 30, f"the Jobs page did not show the cancelled job's {rest['rows_done']} rows done as REST does")


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_rest_gateway.ipynb", "03_custom_task.ipynb",
                                  "04_openai_batch.ipynb"])
def test_notebook_runs_clean(stack: dict[str, Any], name: str, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (the dev extra has it)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (the dev extra has it)")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    env = {**stack["env"], "BITINGLIP_SCHEDULER": stack["urls"]["scheduler"], "BITINGLIP_RUN_DIR": str(stack["run_dir"]),
           "HF_HUB_OFFLINE": "1"}
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, when one fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


def test_down_stops_every_process(stack: dict[str, Any]) -> None:
    pids = stack["pids"] | _stack_pids(stack)
    assert len(pids) >= 5  # up, redis, scheduler, the worker's nanny and process, gateway
    r = subprocess.run([sys.executable, "-m", "bitinglip", "down", "--run-dir", str(stack["run_dir"])],
                       env=stack["env"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    stack["proc"].wait(30)
    left = sorted(pid for pid in pids if _running(pid))
    assert left == [], [psutil.Process(p).cmdline() for p in left]
    assert not (stack["run_dir"] / "stack.json").exists()
    assert "stopped: redis, scheduler, workers, gateway" in stack["log"].read_text()
