"""The model access log: one JSON line per add, download, verify, load,
eviction and removal.

Lines go to ``MODEL_CACHE_DIR/.bitinglip/access.log`` (appended under an
exclusive ``flock``, so processes sharing the folder do not interleave) and,
when ``REDIS_URL`` is set, to the Redis stream :func:`keys.access_log`.
The file is the full record; the stream is trimmed to the newest events.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bitinglip import redis_keys as keys
from bitinglip.settings import Settings

log = logging.getLogger(__name__)

#: events kept in the Redis stream (approximate trim); the file keeps everything
STREAM_MAXLEN = 100_000


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid:{os.getuid()}"


def log_path(settings: Settings) -> Path:
    return settings.model_cache_dir / ".bitinglip" / "access.log"


class AccessLog:
    """Appends access events; cheap to create, opens Redis on first use."""

    def __init__(self, settings: Settings) -> None:
        self.path = log_path(settings)
        self.redis_url = settings.redis_url
        self._redis: Any = None

    def append(self, event: str, model: str, version: str | None = None, sha256: str | None = None,
               actor: str | None = None, worker: str | None = None, **detail: Any) -> dict[str, Any]:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                  "event": event, "actor": actor or default_actor(), "model": model, "version": version,
                  "sha256": sha256, "worker": worker, **detail}
        line = json.dumps(record, sort_keys=False, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(line)
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        if self.redis_url:
            self._to_stream(record)
        return record

    def _to_stream(self, record: dict[str, Any]) -> None:
        fields = {k: v if isinstance(v, str) else json.dumps(v, default=str)
                  for k, v in record.items() if v is not None}
        try:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(self.redis_url)
            self._redis.xadd(keys.access_log(), fields, maxlen=STREAM_MAXLEN, approximate=True)
        except Exception as exc:  # noqa: BLE001 - the file line is written; a Redis outage must not stop loads
            log.warning("access log: Redis stream %s not written (%s); the line is in %s",
                        keys.access_log(), exc, self.path)

    def read(self) -> list[dict[str, Any]]:
        """Every event in the file, oldest first."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]
