"""A job's public record, as every job route shows it."""

from __future__ import annotations

import time
from typing import Any

from bitinglip.gateway.handlers import scrub
from bitinglip.platform.jobs import JobState, rate_and_eta


def view(job: dict[str, Any], admin: bool = False) -> dict[str, Any]:
    """A job's public record, with rate and ETA worked out from Redis's figures."""
    done, total = job.get("rows_done", 0), job.get("rows_total")
    if job["state"] == JobState.SUCCEEDED.value and total is not None:
        done = total  # parts resumed from committed output send no progress events
    started, finished = job.get("started_at"), job.get("finished_at")
    state = job["state"]
    rate, eta = rate_and_eta(done, total, started, finished or time.time(), state)
    out = {"id": job["id"], "state": state, "task": job.get("task"), "model": job.get("model"),
           "priority": job.get("priority"), "rows_done": done, "rows_total": total,
           "rows_reused": int(job.get("rows_reused") or 0),
           "rows_per_s": round(rate, 3), "eta_s": None if eta is None else round(eta, 3),
           "error": job.get("error") and scrub(job["error"]), "created_at": job.get("created_at"), "started_at": started,
           "finished_at": finished, "idempotency_key": job.get("idempotency_key")}
    if admin:
        out["owner"] = job.get("owner")
    return out
