"""Structured logs: one JSON object per line, ready for ELK or Fluentd.

Every line has ``ts`` (UTC, ISO 8601), ``level``, ``logger`` and ``msg``;
``job_id`` and ``request_id`` when known (passed as ``extra=`` or set for a
request with :data:`REQUEST_ID`), and any other ``extra=`` fields as they
are.  ``configure("json")`` installs it on the root logger of a process::

    log.info("job %s", state, extra={"job_id": job, "event": "job.succeeded"})
    # {"ts": "...", "level": "info", "logger": "bitinglip.ops", "msg": "job succeeded",
    #  "job_id": "...", "event": "job.succeeded"}
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from typing import Any

FORMATS = ("text", "json")
#: the request being served (the gateway's middleware sets it), for every log line written meanwhile
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("bitinglip_request_id", default=None)
#: attributes every LogRecord has; anything else came in through ``extra=``
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        request_id = REQUEST_ID.get()
        if request_id is not None:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(fmt: str = "text", level: int | str = logging.INFO) -> None:
    """Send this process's logs to stderr, as text or JSON lines. Replaces
    the root logger's handlers, and makes the loggers that Dask and uvicorn
    configure for themselves go through the root one."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if fmt == "json":
        for name in ("distributed", "uvicorn", "uvicorn.error", "uvicorn.access", "bitinglip"):
            logger = logging.getLogger(name)
            logger.handlers[:] = []
            logger.propagate = True



def dask_env(fmt: str) -> dict[str, str]:
    """Environment for ``dask worker`` processes (nanny and worker) that
    log in ``fmt``: a preload switches them to JSON as they start."""
    if fmt != "json":
        return {}
    preload = repr(["bitinglip.platform.cluster.worker_log_preload"])
    return {"DASK_DISTRIBUTED__WORKER__PRELOAD": preload, "DASK_DISTRIBUTED__NANNY__PRELOAD": preload}
