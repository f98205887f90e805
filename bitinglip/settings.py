"""Settings, read once from the environment into one frozen object.

The seed's variables keep their names (``ENVIRONMENT``, ``REDIS_URL``,
``MODEL_CACHE_DIR``, ``GPU_MEMORY_FRACTION``, ``MAX_WORKERS``); everything
BitingLip adds is prefixed ``BITINGLIP_``.  An invalid value raises
:class:`~bitinglip.errors.ConfigError` naming the variable, so a
misconfigured process stops at start-up instead of failing later.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, TypeVar

from bitinglip.errors import ConfigError

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


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be above 0")
    return value


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return raw


def _flag(raw: str) -> bool:
    value = raw.lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError("not a yes/no value")
    return value in ("1", "true", "yes", "on")


class Rate(NamedTuple):
    """A rate limit: ``count`` requests per ``period_s`` seconds."""

    count: int
    period_s: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period_s:g}s"


_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


def _rate(raw: str) -> Rate:
    count, _, period = raw.partition("/")
    period = period.strip().lower().rstrip("s") or "minute"
    if period not in _PERIODS:
        raise ValueError(f"period must be one of {', '.join(_PERIODS)}")
    return Rate(_positive(count.strip()), _PERIODS[period])


#: the seed's default for submissions, and a read limit high enough to poll a job
SUBMIT_RATE = Rate(10, 60.0)
READ_RATE = Rate(600, 60.0)
#: online inference is many small calls: its own bucket, well above submissions
INFER_RATE = Rate(600, 60.0)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(raw: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


def _pem_or_path(raw: str) -> str:
    if "-----BEGIN" in raw:
        return raw
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ValueError("neither a PEM text nor a readable file")
    return path.read_text()


def _pem_file(raw: str) -> Path:
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise ValueError("no such file")
    return path


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

    # --- the model manager
    #: admin switch: load and register pickle-based weights (.bin, .pt, .pkl); never on by default
    allow_pickle: bool = False
    #: bytes of loaded models a CPU worker keeps before evicting the least recently used; 0: half its memory
    cpu_model_budget_bytes: int = 0
    #: the most bytes one model's files may add up to when it is registered (checked before and while copying)
    model_max_bytes: int = 64 << 30
    #: the Hugging Face hub cache (HF_HUB_CACHE); None: the hub's own default
    hf_cache_dir: Path | None = None
    #: resolve hub models from the local cache only (HF_HUB_OFFLINE)
    hf_offline: bool = False
    #: bytes of KV cache a generation engine (vLLM) takes; 0: 1 GiB on a CPU worker, vLLM's own share of a GPU
    kv_cache_bytes: int = 0
    #: GPUs each generation worker holds (resource GPU=N): vLLM splits a model over them (tensor parallelism)
    gpus_per_worker: int = 1

    # --- Dask's TLS between scheduler, workers and clients (all three or none)
    #: CA certificate, and this host's certificate and key (PEM files): with them
    #: every Dask connection is ``tls://`` and needs a certificate the CA signed
    tls_ca_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    # --- the gateway
    #: Dask scheduler the gateway submits to; None starts an embedded cluster
    scheduler_address: str | None = None
    #: HS256 secret, or an RS256 public key (PEM); production needs one of them
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    #: the longest a token may live (exp - iat, or exp - now without iat): a leaked token
    #: of a century stays a key for a century; ``bitinglip token`` mints no longer ones
    jwt_max_ttl_s: int = 30 * 86400
    #: per token subject, counted in Redis: submissions, and everything else
    rate_limit: Rate = SUBMIT_RATE
    read_rate_limit: Rate = READ_RATE
    infer_rate_limit: Rate = INFER_RATE
    #: per token subject, in one gateway: online generation in flight, as the sum of n x max_tokens (four chats of
    #: n=16, max_tokens=1024 kept both workers' engines busy for minutes), and json_schema requests in flight
    #: (each a grammar to compile, up to about 30 s of CPU for a 44 kB schema)
    tenant_generation_tokens: int = 32_768
    tenant_grammars: int = 2
    #: Redis connections per gateway process; a request beyond them waits up to
    #: ``redis_pool_timeout_s`` for one instead of failing (redis-py's own pool
    #: stops at 100 and reports "too many connections" as Redis being down)
    redis_max_connections: int = 256
    redis_pool_timeout_s: float = 5.0
    #: submissions running at once in their own threads, so that reads never wait behind them
    submit_threads: int = 8
    #: seconds a client may take to send its request body (then 408), and to
    #: open its next request on a kept-alive connection
    body_timeout_s: float = 30.0
    keep_alive_s: int = 5
    #: seconds a client may take to send its request line and headers (then the connection closes)
    header_timeout_s: float = 10.0
    #: bytes of request line and headers a client may send before h11 refuses it
    max_header_bytes: int = 65_536
    admin_allowlist: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"),
                                            ipaddress.ip_network("::1/128"))
    #: X-Forwarded-For is read only from these addresses
    trusted_proxies: tuple[Network, ...] = ()
    max_body_bytes: int = 1_048_576
    max_job_rows: int = 10_000
    max_infer_rows: int = 64
    max_text_chars: int = 10_000
    #: seconds a finished job's record stays in Redis; running jobs never expire
    job_ttl_s: int = 7 * 86400
    #: where REST jobs write Parquet; workers and gateways must all see it
    results_dir: Path = Path.home() / ".cache" / "bitinglip" / "results"
    #: the result store of rows that later jobs reuse (see jobs.reuse), read and written by the workers;
    #: None: ``model_cache_dir/.bitinglip/results``. Past ``reuse_max_bytes`` its least recently used files go; 0 turns reuse off
    reuse_dir: Path | None = None
    reuse_max_bytes: int = 10 << 30
    #: the only directory that job input URIs may point into; None refuses URIs
    input_dir: Path | None = None
    #: how long /v1/infer waits to gather concurrent requests into one batch
    infer_batch_ms: float = 5.0
    #: the OpenAI-compatible Files and Batches: the largest batch file, in bytes and in lines (OpenAI's own limits)
    batch_max_bytes: int = 200_000_000
    batch_max_lines: int = 50_000
    #: bytes of uploaded files one token subject may keep at once (five of the largest batch files):
    #: past it an upload is refused until files are deleted or expire
    files_max_bytes_per_tenant: int = 1_000_000_000

    # --- tests only, never read from the environment (set with ``with_``)
    #: a micro-batch above this many tokens raises MemoryError on the worker; 0: off
    fault_oom_above_tokens: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        default = cls()
        settings = cls(
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
            allow_pickle=_read(env, "BITINGLIP_ALLOW_PICKLE", False, _flag, "true or false"),
            cpu_model_budget_bytes=_read(env, "BITINGLIP_CPU_MODEL_BUDGET_BYTES", 0, _non_negative,
                                         "a whole number of bytes, 0 for automatic"),
            kv_cache_bytes=_read(env, "BITINGLIP_KV_CACHE_BYTES", 0, _non_negative,
                                 "a whole number of bytes, 0 for automatic"),
            gpus_per_worker=_read(env, "BITINGLIP_GPUS_PER_WORKER", 1, _positive, "a whole number of GPUs"),
            model_max_bytes=_read(env, "BITINGLIP_MODEL_MAX_BYTES", default.model_max_bytes, _positive,
                                  "a whole number of bytes"),
            hf_cache_dir=_read(env, "HF_HUB_CACHE", None, lambda s: Path(s).expanduser(), "a directory path"),
            hf_offline=_read(env, "HF_HUB_OFFLINE", False, _flag, "1 or 0"),
            scheduler_address=_read(env, "BITINGLIP_SCHEDULER", None, str, "a scheduler address"),
            jwt_secret=_read(env, "BITINGLIP_JWT_SECRET", None, str, "a secret string"),
            jwt_public_key=_read(env, "BITINGLIP_JWT_PUBLIC_KEY", None, _pem_or_path,
                                 "a PEM public key or the path of one"),
            jwt_issuer=_read(env, "BITINGLIP_JWT_ISSUER", None, str, "an issuer string"),
            jwt_audience=_read(env, "BITINGLIP_JWT_AUDIENCE", None, str, "an audience string"),
            jwt_max_ttl_s=_read(env, "BITINGLIP_JWT_MAX_TTL", default.jwt_max_ttl_s, _positive,
                                "a whole number of seconds"),
            rate_limit=_read(env, "BITINGLIP_RATE_LIMIT", default.rate_limit, _rate, "N/second|minute|hour|day"),
            read_rate_limit=_read(env, "BITINGLIP_READ_RATE_LIMIT", default.read_rate_limit, _rate,
                                  "N/second|minute|hour|day"),
            infer_rate_limit=_read(env, "BITINGLIP_INFER_RATE_LIMIT", default.infer_rate_limit, _rate,
                                   "N/second|minute|hour|day"),
            tenant_generation_tokens=_read(env, "BITINGLIP_TENANT_GENERATION_TOKENS", default.tenant_generation_tokens,
                                           _positive, "a whole number of tokens (n x max_tokens)"),
            tenant_grammars=_read(env, "BITINGLIP_TENANT_GRAMMARS", default.tenant_grammars, _positive,
                                  "a whole number of requests"),
            redis_max_connections=_read(env, "BITINGLIP_REDIS_MAX_CONNECTIONS", default.redis_max_connections,
                                        _positive, "a whole number of connections"),
            redis_pool_timeout_s=_read(env, "BITINGLIP_REDIS_POOL_TIMEOUT", default.redis_pool_timeout_s,
                                       _positive_float, "a number of seconds above 0"),
            submit_threads=_read(env, "BITINGLIP_SUBMIT_THREADS", default.submit_threads, _positive,
                                 "a whole number of threads"),
            body_timeout_s=_read(env, "BITINGLIP_BODY_TIMEOUT", default.body_timeout_s, _positive_float,
                                 "a number of seconds above 0"),
            header_timeout_s=_read(env, "BITINGLIP_HEADER_TIMEOUT", default.header_timeout_s, _positive_float,
                                   "a number of seconds above 0"),
            keep_alive_s=_read(env, "BITINGLIP_KEEP_ALIVE", default.keep_alive_s, _positive,
                               "a whole number of seconds"),
            max_header_bytes=_read(env, "BITINGLIP_MAX_HEADER_BYTES", default.max_header_bytes, _positive,
                                   "a whole number of bytes"),
            admin_allowlist=_read(env, "BITINGLIP_ADMIN_ALLOWLIST", default.admin_allowlist, _networks,
                                  "comma-separated CIDRs"),
            trusted_proxies=_read(env, "BITINGLIP_TRUSTED_PROXIES", (), _networks, "comma-separated CIDRs"),
            max_body_bytes=_read(env, "BITINGLIP_MAX_BODY_BYTES", default.max_body_bytes, _positive,
                                 "a whole number of bytes"),
            max_job_rows=_read(env, "BITINGLIP_MAX_JOB_ROWS", default.max_job_rows, _positive,
                               "a whole number of rows"),
            max_infer_rows=_read(env, "BITINGLIP_MAX_INFER_ROWS", default.max_infer_rows, _positive,
                                 "a whole number of rows"),
            max_text_chars=_read(env, "BITINGLIP_MAX_TEXT_CHARS", default.max_text_chars, _positive,
                                 "a whole number of characters"),
            job_ttl_s=_read(env, "BITINGLIP_JOB_TTL", default.job_ttl_s, _positive, "a whole number of seconds"),
            results_dir=_read(env, "BITINGLIP_RESULTS_DIR", default.results_dir,
                              lambda s: Path(s).expanduser(), "a directory path"),
            reuse_dir=_read(env, "BITINGLIP_REUSE_DIR", None, lambda s: Path(s).expanduser(), "a directory path"),
            reuse_max_bytes=_read(env, "BITINGLIP_REUSE_MAX_BYTES", default.reuse_max_bytes, _non_negative,
                                  "a whole number of bytes, 0 to turn reuse off"),
            input_dir=_read(env, "BITINGLIP_INPUT_DIR", None, lambda s: Path(s).expanduser().resolve(),
                            "a directory path"),
            infer_batch_ms=_read(env, "BITINGLIP_INFER_BATCH_MS", default.infer_batch_ms, float,
                                 "a number of milliseconds"),
            batch_max_bytes=_read(env, "BITINGLIP_BATCH_MAX_BYTES", default.batch_max_bytes, _positive,
                                  "a whole number of bytes"),
            batch_max_lines=_read(env, "BITINGLIP_BATCH_MAX_LINES", default.batch_max_lines, _positive,
                                  "a whole number of lines"),
            files_max_bytes_per_tenant=_read(env, "BITINGLIP_FILES_MAX_BYTES_PER_TENANT",
                                             default.files_max_bytes_per_tenant, _positive, "a whole number of bytes"),
            tls_ca_file=_read(env, "BITINGLIP_TLS_CA_FILE", None, _pem_file, "a PEM file"),
            tls_cert=_read(env, "BITINGLIP_TLS_CERT", None, _pem_file, "a PEM file"),
            tls_key=_read(env, "BITINGLIP_TLS_KEY", None, _pem_file, "a PEM file"),
        )
        settings.check_tls("BITINGLIP_TLS_CA_FILE", "BITINGLIP_TLS_CERT", "BITINGLIP_TLS_KEY")
        return settings

    @property
    def tls(self) -> bool:
        """Whether Dask connections use TLS."""
        return self.tls_ca_file is not None

    def check_tls(self, *names: str) -> None:
        """TLS needs the CA, the certificate and the key together."""
        given = [self.tls_ca_file, self.tls_cert, self.tls_key]
        if any(given) and not all(given):
            missing = [n for n, v in zip(names, given) if v is None]
            raise ConfigError(f"Dask TLS needs {', '.join(names)} together; missing {', '.join(missing)}")

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (the object itself never changes)."""
        return replace(self, **changes)  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
