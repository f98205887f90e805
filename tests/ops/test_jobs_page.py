"""The Jobs page on the embedded cluster that ``run`` and ``connect()``
start: served on the dashboard they print, and linked from its top bar."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest


def _dom(url: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; scripts/install-services.sh does)")
    page = subprocess.run([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--dump-dom", url], capture_output=True, text=True, timeout=90,
                          check=False)
    assert page.returncode == 0, page.stderr[-2000:]
    return page.stdout


def test_the_embedded_cluster_serves_the_jobs_page_and_links_it(platform: Any, tiny_encoder: Path) -> None:
    dashboard = platform.dashboard_link.rsplit("/status", 1)[0]
    job = platform.submit("embed", model=str(tiny_encoder), inputs=["the cat", "sat on", "the mat"])
    job.wait()

    def listed() -> dict[str, Any] | None:
        jobs = httpx.get(f"{dashboard}/bitinglip/jobs.json", timeout=30).json()["jobs"]
        return next((j for j in jobs if j["job"] == job.id and j["state"] == "succeeded"), None)

    shown = None
    for _ in range(100):  # the last partition's event may trail the job's end by a moment
        shown = listed()
        if shown:
            break
        time.sleep(0.1)
    assert shown is not None and shown["rows_done"] == 3 == job.rows_done()

    status = _dom(f"{dashboard}/status")  # every dashboard page has the link in its top bar
    assert re.search(r'<a href="jobs">Jobs</a>', status), status[:3000]
    page = _dom(f"{dashboard}/jobs")  # where the link leads: the Jobs page
    row = re.search(rf'<tr class="job state-succeeded" data-job="{job.id}">(.*?)</tr>', page, re.DOTALL)
    assert row is not None, page[:3000]
    assert '<span class="rows">3/3</span>' in row.group(1)
