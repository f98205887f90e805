"""Settings, read once from the environment into one frozen object.

The seed's variables keep their names (``ENVIRONMENT``, ``REDIS_URL``,
``MODEL_CACHE_DIR``, ``GPU_MEMORY_FRACTION``, ``MAX_WORKERS``); everything
BitingLip adds is prefixed ``BITINGLIP_``.  An invalid value raises
:class:`~bitinglip.platform.errors.ConfigError` naming the variable, so a
misconfigured process stops at start-up instead of failing later.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from bitinglip.platform.errors import ConfigError

ENVIRONMENTS = ("development", "test", "production")
T = TypeVar("T")


def _read(env: Mapping[str, str], name: str, default: T, cast: Callable[[str], T], rule: str) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return cast(raw.strip())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}={raw!r} is invalid: {rule} ({exc})") from None


def _environment(raw: str) -> str:
    value = raw.lower()
    if value not in ENVIRONMENTS:
        raise ValueError(f"not one of {', '.join(ENVIRONMENTS)}")
    return value


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 < value <= 1.0:
        raise ValueError("out of range")
    return value


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return raw


@dataclass(frozen=True)
class Settings:
    """Everything configurable, in one place. Build it with :meth:`from_env`."""

    environment: str = "development"
    redis_url: str | None = None
    model_cache_dir: Path = Path.home() / ".cache" / "bitinglip" / "models"
    gpu_memory_fraction: float = 0.9
    #: worker processes for an embedded cluster; None means one per GPU, or one per core
    max_workers: int | None = None
    #: tokens (rows x longest row) per micro-batch; 0 picks by device
    token_budget: int = 0
    #: rows per partition; 0 picks from the input size and the workers
    partition_rows: int = 0
    dashboard_address: str = ":8787"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        default = cls()
        return cls(
            environment=_read(env, "ENVIRONMENT", default.environment, _environment,
                              f"one of {', '.join(ENVIRONMENTS)}"),
            redis_url=_read(env, "REDIS_URL", None, _redis_url, "a redis:// URL"),
            model_cache_dir=_read(env, "MODEL_CACHE_DIR", default.model_cache_dir,
                                  lambda s: Path(s).expanduser(), "a directory path"),
            gpu_memory_fraction=_read(env, "GPU_MEMORY_FRACTION", default.gpu_memory_fraction,
                                      _fraction, "a number in (0, 1]"),
            max_workers=_read(env, "MAX_WORKERS", None, _positive, "a whole number of at least 1"),
            token_budget=_read(env, "BITINGLIP_TOKEN_BUDGET", 0, _non_negative,
                               "a whole number of tokens, 0 for automatic"),
            partition_rows=_read(env, "BITINGLIP_PARTITION_ROWS", 0, _non_negative,
                                 "a whole number of rows, 0 for automatic"),
            dashboard_address=_read(env, "BITINGLIP_DASHBOARD_ADDRESS", default.dashboard_address,
                                    str, "an address such as :8787"),
        )

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (the object itself never changes)."""
        return replace(self, **changes)  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
