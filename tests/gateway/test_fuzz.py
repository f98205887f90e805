"""Schemathesis against /openapi.json with a valid token: no 5xx anywhere,
and the scheduler still has every worker it had (a value the scheduler
cannot serialise once dropped them all, behind a 503)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from gwtools import auth, serve

from bitinglip.platform.cluster.local import worker_resources
from bitinglip.settings import Rate, Settings

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_error(gw_settings: Settings, models: dict[str, str], platform: Any,
                                            tmp_path: Path) -> None:
    beside = Path(sys.executable).parent / "schemathesis"  # the venv's, whether or not it is on PATH
    exe = str(beside) if beside.exists() else shutil.which("schemathesis")
    if exe is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    settings = gw_settings.with_(rate_limit=Rate(100_000, 60.0), read_rate_limit=Rate(100_000, 60.0))
    headers = auth("fuzzer", "jobs:read jobs:write admin")
    workers = set(worker_resources(platform.client))
    with serve(settings) as url:
        spec = httpx.get(f"{url}/openapi.json", headers=headers).json()
        (tmp_path / "openapi.json").write_text(json.dumps(spec))
        run = subprocess.run(
            [exe, "run", str(tmp_path / "openapi.json"), "--url", url, "-H",
             f"Authorization: {headers['Authorization']}", "--checks", "not_a_server_error",
             "--max-examples", "15", "--seed", "1", "--request-timeout", "60", "--max-failures", "5",
             "--exclude-path", "/v1/jobs/{job_id}/events", "--phases", "examples,coverage,fuzzing"],
            check=False, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert generated and int(generated[1]) > 100 and generated[1] == generated[2], run.stdout[-3000:]
    assert set(worker_resources(platform.client)) == workers, "the fuzzing cost the cluster workers"
