"""Settings, read once from the environment into one frozen object.

The fields of :class:`Settings` are the whole list: each declares its type,
its default, its bounds and its environment variable, and pydantic-settings
reads them.  The seed's variables keep their names (``ENVIRONMENT``,
``REDIS_URL``, ``MODEL_CACHE_DIR``, ``GPU_MEMORY_FRACTION``, ``MAX_WORKERS``);
everything BitingLip adds is prefixed ``BITINGLIP_``.  An invalid value raises
:class:`~bitinglip.errors.ConfigError` naming the variable, so a
misconfigured process stops at start-up instead of failing later.

A process reads its settings once, with :func:`get_settings`
(:meth:`Settings.from_env`, which checks the TLS files belong together and
turns a bad value into a ``ConfigError``), and hands the object on: to its
plugins, and through them to the workers, which never read their own
environment for a value that the client's settings carry.  ``Settings(...)``
is pydantic-settings' usual build: the given values over the environment.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from bitinglip.errors import ConfigError

Environment = Literal["development", "test", "production"]
PREFIX = "BITINGLIP_"


class Rate(NamedTuple):
    """A rate limit: ``count`` requests per ``period_s`` seconds."""

    count: int
    period_s: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period_s:g}s"


_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


def _rate(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    count, _, period = raw.partition("/")
    period = period.strip().lower().rstrip("s") or "minute"
    if period not in _PERIODS:
        raise ValueError(f"period must be one of {', '.join(_PERIODS)}")
    try:
        value = int(count.strip())
    except ValueError:
        raise ValueError(f"{count.strip()!r} is not a whole number of requests") from None
    if value < 1:
        raise ValueError("the count must be at least 1")
    return Rate(value, _PERIODS[period])


#: the seed's default for submissions, and a read limit high enough to poll a job
SUBMIT_RATE = Rate(10, 60.0)
READ_RATE = Rate(600, 60.0)
#: online inference is many small calls: its own bucket, well above submissions
INFER_RATE = Rate(600, 60.0)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


def _pem_or_path(raw: Any) -> Any:
    if not isinstance(raw, str) or "-----BEGIN" in raw:
        return raw
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ValueError("neither a PEM text nor a readable file")
    return path.read_text()


def _pem_file(raw: Any) -> Any:
    if raw is None:
        return raw
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise ValueError("no such file")
    return path


def _redis_url(raw: Any) -> Any:
    if isinstance(raw, str) and not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return raw


def _user_path(raw: Any) -> Any:
    return Path(raw).expanduser() if isinstance(raw, str) else raw


def _resolved_path(raw: Any) -> Any:
    return Path(raw).expanduser().resolve() if isinstance(raw, str) else raw


def _lower(raw: Any) -> Any:
    return raw.lower() if isinstance(raw, str) else raw


Rates = Annotated[Rate, NoDecode, BeforeValidator(_rate)]
Networks = Annotated[tuple[Network, ...], NoDecode, BeforeValidator(_networks)]
UserPath = Annotated[Path, BeforeValidator(_user_path)]
PemFile = Annotated[Path | None, BeforeValidator(_pem_file)]


#: marks a field whose value ``bitinglip config`` never prints
SECRET = {"secret": True}
#: marks a field that tests set with ``with_`` and the environment never does
NOT_FROM_ENV = {"from_env": False}


class Settings(BaseSettings):
    """Everything configurable, in one place. Build it with :meth:`from_env`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="forbid", validate_by_name=True,
                                      env_ignore_empty=True, protected_namespaces=())

    # a field's variable is BITINGLIP_<NAME> unless validation_alias names its own (the seed's, Hugging Face's,
    # or a shorter one that shipped); every bound is declared here and nowhere else
    environment: Annotated[Environment, BeforeValidator(_lower)] = Field(
        "development", validation_alias="ENVIRONMENT", description="development, test or production")
    redis_url: Annotated[str | None, BeforeValidator(_redis_url)] = Field(
        None, validation_alias="REDIS_URL", description="redis://, rediss:// or unix:// URL of the job store")
    model_cache_dir: UserPath = Field(Path.home() / ".cache" / "bitinglip" / "models",
                                      validation_alias="MODEL_CACHE_DIR", description="the model registry's directory")
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1, validation_alias="GPU_MEMORY_FRACTION",
                                       description="share of its GPU a worker (and its vLLM engine) may take")
    max_workers: int | None = Field(None, ge=1, validation_alias="MAX_WORKERS",
                                    description="worker processes of an embedded cluster; unset: one per GPU, "
                                                "or one per core")
    token_budget: int = Field(0, ge=0, description="padded tokens (rows x longest row) per micro-batch; "
                                                   "0: timed by each CPU worker as a model loads, 32768 on a GPU")
    torch_threads: int = Field(0, ge=0, le=1024, description="torch intra-op threads per CPU worker; 0: its "
                               "share of the cores, timed against fewer as a model loads where the share is more "
                               "than one")
    partition_rows: int = Field(0, ge=0, description="rows per partition; 0 picks from the input size and "
                                                     "the workers")
    dashboard_address: str = Field(":8787", description="where an embedded cluster serves the Dask dashboard")

    # a scheduler far away, or workers busy loading a model, answer slower than a local cluster
    model_lookup_timeout_s: float = Field(10.0, gt=0, validation_alias="BITINGLIP_MODEL_LOOKUP_TIMEOUT",
                                          description="seconds a remote worker has to say where a model is")

    # --- the model manager
    allow_pickle: bool = Field(False, description="admin switch: load and register pickle-based weights "
                                                  "(.bin, .pt, .pkl); never on by default")
    cpu_model_budget_bytes: int = Field(0, ge=0, description="bytes of loaded models a CPU worker keeps before "
                                                             "evicting the least recently used; 0: half its memory")
    model_max_bytes: int = Field(64 << 30, ge=1, description="the most bytes one model's files may add up to when "
                                                             "it is registered (checked before and while copying)")
    hf_cache_dir: UserPath | None = Field(None, validation_alias="HF_HUB_CACHE",
                                          description="the Hugging Face hub cache; unset: the hub's own default")
    hf_offline: bool = Field(False, validation_alias="HF_HUB_OFFLINE",
                             description="resolve hub models from the local cache only")
    kv_cache_bytes: int = Field(0, ge=0, description="bytes of KV cache a generation engine takes; 0: 1 GiB on a "
                                                     "CPU worker, vLLM's own share of a GPU")
    gpus_per_worker: int = Field(1, ge=1, description="GPUs each generation worker holds (resource GPU=N): vLLM "
                                                      "splits a model over them (tensor parallelism)")

    # --- Dask's TLS between scheduler, workers and clients (all three or none): with them every Dask
    # connection is tls:// and needs a certificate the CA signed
    tls_ca_file: PemFile = Field(None, description="CA certificate (PEM) that signed every Dask host's certificate")
    tls_cert: PemFile = Field(None, description="this host's certificate (PEM)")
    tls_key: PemFile = Field(None, description="this host's private key (PEM)", json_schema_extra=SECRET)

    # --- the gateway
    scheduler_address: str | None = Field(None, validation_alias="BITINGLIP_SCHEDULER",
                                          description="Dask scheduler the gateway submits to; unset starts an "
                                                      "embedded cluster")
    jwt_secret: str | None = Field(None, description="HS256 secret; production needs it or a public key",
                                   json_schema_extra=SECRET)
    jwt_public_key: Annotated[str | None, BeforeValidator(_pem_or_path)] = Field(
        None, description="RS256 public key (PEM, or the path of one)")
    jwt_issuer: str | None = Field(None, description="the iss claim a token must carry")
    jwt_audience: str | None = Field(None, description="the aud claim a token must carry")
    # a leaked token of a century stays a key for a century; ``bitinglip token`` mints no longer ones
    jwt_max_ttl_s: int = Field(30 * 86400, ge=1, validation_alias="BITINGLIP_JWT_MAX_TTL",
                               description="seconds a token may live at most (exp - iat, or exp - now)")
    rate_limit: Rates = Field(SUBMIT_RATE, description="submissions per token subject, counted in Redis "
                                                       "(N/second|minute|hour|day)")
    read_rate_limit: Rates = Field(READ_RATE, description="reads per token subject (N/second|minute|hour|day)")
    infer_rate_limit: Rates = Field(INFER_RATE, description="online inference calls per token subject "
                                                            "(N/second|minute|hour|day)")
    # four chats of n=16, max_tokens=1024 kept both workers' engines busy for minutes; a json_schema request
    # is a grammar to compile, up to about 30 s of CPU for a 44 kB schema
    tenant_generation_tokens: int = Field(32_768, ge=1, description="per token subject, in one gateway: online "
                                                                    "generation in flight, as the sum of n x "
                                                                    "max_tokens")
    tenant_grammars: int = Field(2, ge=1, description="per token subject, in one gateway: json_schema requests "
                                                      "in flight")
    # redis-py's own pool stops at 100 and reports "too many connections" as Redis being down
    redis_max_connections: int = Field(256, ge=1, description="Redis connections per gateway process")
    redis_pool_timeout_s: float = Field(5.0, gt=0, validation_alias="BITINGLIP_REDIS_POOL_TIMEOUT",
                                        description="seconds a request waits for a Redis connection beyond them")
    submit_threads: int = Field(8, ge=1, description="submissions running at once in their own threads, so that "
                                                     "reads never wait behind them")
    body_timeout_s: float = Field(30.0, gt=0, validation_alias="BITINGLIP_BODY_TIMEOUT",
                                  description="seconds a client may take to send its request body (then 408)")
    keep_alive_s: int = Field(5, ge=1, validation_alias="BITINGLIP_KEEP_ALIVE",
                              description="seconds a kept-alive connection waits for its next request")
    header_timeout_s: float = Field(10.0, gt=0, validation_alias="BITINGLIP_HEADER_TIMEOUT",
                                    description="seconds a client may take to send its request line and headers")
    max_header_bytes: int = Field(65_536, ge=1, description="bytes of request line and headers a client may send")
    admin_allowlist: Networks = Field((ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
                                      description="comma-separated CIDRs that may call the admin routes")
    trusted_proxies: Networks = Field((), description="comma-separated CIDRs whose X-Forwarded-For is read")
    max_body_bytes: int = Field(1_048_576, ge=1, description="bytes of a request body")
    max_job_rows: int = Field(10_000, ge=1, description="rows of a job submitted with its data inline")
    max_infer_rows: int = Field(64, ge=1, description="rows of one /v1/infer call")
    max_text_chars: int = Field(10_000, ge=1, description="characters of one text")
    # running jobs never expire
    job_ttl_s: int = Field(7 * 86400, ge=1, validation_alias="BITINGLIP_JOB_TTL",
                           description="seconds a finished job's record stays in Redis")
    results_dir: UserPath = Field(Path.home() / ".cache" / "bitinglip" / "results",
                                  description="where REST jobs write Parquet; workers and gateways must all see it")
    # workers read and write it (jobs.reuse); None: model_cache_dir/.bitinglip/results, which every worker shares
    reuse_dir: Annotated[Path | None, BeforeValidator(_user_path)] = Field(
        None, description="where workers keep results that later jobs reuse; unset: MODEL_CACHE_DIR/.bitinglip/results")
    reuse_max_bytes: int = Field(10 << 30, ge=0, description="bytes of reusable results kept; past it the least "
                                                             "recently used files go; 0 turns reuse off")
    input_dir: Annotated[Path | None, BeforeValidator(_resolved_path)] = Field(
        None, description="the only directory that job input URIs may point into; unset refuses URIs")
    # gpt-class generation of a few thousand tokens on a slow GPU outlasts the default: a deployment sets its own
    infer_timeout_s: float = Field(120.0, gt=0, validation_alias="BITINGLIP_INFER_TIMEOUT",
                                   description="seconds an online call (/v1/infer, the OpenAI routes) waits for its "
                                               "batch's result before a 503")
    shutdown_grace_s: float = Field(5.0, gt=0, validation_alias="BITINGLIP_SHUTDOWN_GRACE",
                                    description="seconds a stopping gateway lets requests in flight finish (match "
                                                "the orchestrator's grace period)")
    infer_batch_ms: float = Field(5.0, ge=0, description="how long /v1/infer waits to gather concurrent requests "
                                                         "into one batch")
    # the OpenAI-compatible Files and Batches: OpenAI's own limits
    batch_max_bytes: int = Field(200_000_000, ge=1, description="bytes of one batch file")
    batch_max_lines: int = Field(50_000, ge=1, description="lines of one batch file")
    # each distinct schema is a grammar every worker compiles (up to about 30 s of CPU for a 44 kB schema), beside
    # the engine other tenants share; a line past them is its 400
    batch_max_schemas: int = Field(16, ge=1, description="distinct json_schema response formats in one batch file")
    files_max_bytes_per_tenant: int = Field(1_000_000_000, ge=1,
                                            description="bytes of uploaded files one token subject may keep at once "
                                                        "(five of the largest batch files)")

    # --- tests only, never read from the environment (set with ``with_``)
    fault_oom_above_tokens: int = Field(0, ge=0, json_schema_extra=NOT_FROM_ENV,
                                        description="a micro-batch above this many tokens raises MemoryError on "
                                                    "the worker; 0: off")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the given values, then the environment read as from_env reads it (no .env file: a stray one in the
        # working directory would change a deployment without a word)
        return (init_settings, _Environment(settings_cls, os.environ))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings from ``env`` (default: this process's environment)."""
        found = _Environment(cls, os.environ if env is None else env)()
        try:
            # every field given (its default where ``env`` has none), so that the sources add nothing: only ``env``
            settings = cls(**{**{name: f.get_default() for name, f in cls.model_fields.items()}, **found})
        except ValidationError as exc:
            raise ConfigError(_explain(exc, found)) from None
        settings.check_tls(*(env_name(f) for f in ("tls_ca_file", "tls_cert", "tls_key")))
        return settings

    @classmethod
    def sources(cls, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """Where each field of :meth:`from_env`'s settings comes from: its variable's name, or ``default``."""
        found = _Environment(cls, os.environ if env is None else env)()
        return {name: env_name(name) if name in found else "default" for name in cls.model_fields}

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
        """A copy with some fields changed (the object itself never changes), checked as :meth:`from_env` checks."""
        return type(self)(**{**dict(self), **changes})  # every field given: the environment adds nothing

    def __setattr__(self, name: str, value: object) -> None:
        # pydantic says ValidationError; a frozen object's callers (and dataclasses before it) expect AttributeError
        raise AttributeError(f"Settings are frozen: use settings.with_({name}=...) for a changed copy")


def env_name(field: str) -> str:
    """The environment variable of a :class:`Settings` field."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else PREFIX + field.upper()


class _Environment(EnvSettingsSource):
    """pydantic-settings' own reader of variables, over a given mapping (a test's, or os.environ) instead of
    always os.environ; a blank value counts as unset, and a field marked :data:`NOT_FROM_ENV` is never read."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        stripped = {k: v.strip() for k, v in self._given.items() if isinstance(v, str) and v.strip()}
        return {k.lower(): v for k, v in stripped.items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("from_env") is False:
            return None, field_name, False
        return super().get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        # keyed by field name whatever the variable, so that callers need not know the aliases
        by_alias = {str(f.validation_alias): name for name, f in self.settings_cls.model_fields.items()
                    if isinstance(f.validation_alias, str)}
        return {by_alias.get(key, key): value for key, value in super().__call__().items()}


def _explain(exc: ValidationError, found: Mapping[str, Any]) -> str:
    """One line per invalid variable: its name, the value given, and what is wrong with it."""
    lines = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        if field not in Settings.model_fields:
            lines.append(error["msg"])
            continue
        why = error["msg"].removeprefix("Value error, ")
        lines.append(f"{env_name(field)}={found.get(field)!r} is invalid: {why}")
    return "; ".join(dict.fromkeys(lines))


def _masked(field: str, value: Any) -> str:
    if value is None:
        return "(unset)"
    extra = Settings.model_fields[field].json_schema_extra
    if isinstance(extra, dict) and extra.get("secret"):
        return "***"
    if field == "redis_url" and urlsplit(str(value)).password:
        parts = urlsplit(str(value))
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
    if field == "jwt_public_key":
        return f"(PEM, {len(str(value))} characters)"
    return _shown(value)


def _shown(value: Any) -> str:
    """A value as a person writes it in a variable (a path under the home directory with ``~``)."""
    if value is None:
        return "unset"
    if isinstance(value, Rate):
        period = next((name for name, s in _PERIODS.items() if s == value.period_s), None)
        return f"{value.count}/{period}" if period else str(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path):
        home = Path.home()
        return f"~/{value.relative_to(home)}" if value.is_relative_to(home) else str(value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table() -> str:
    """The README's table of variables, from the fields (``bitinglip config --markdown``; a test compares)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for field, info in Settings.model_fields.items():
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("from_env") is False:
            continue
        meaning = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{env_name(field)}` | `{_shown(info.get_default())}` | {meaning} |")
    return "\n".join(lines) + "\n"


def describe(env: Mapping[str, str] | None = None) -> Iterator[tuple[str, str, str, str]]:
    """``(field, variable, source, value)`` for every setting that :meth:`Settings.from_env` builds from ``env``
    (``source``: ``default`` or ``environment``), secrets masked: what ``bitinglip config`` prints."""
    settings = Settings.from_env(env)
    sources = Settings.sources(env)
    for field, info in Settings.model_fields.items():
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("from_env") is False:
            continue
        source = "default" if sources[field] == "default" else "environment"
        yield field, env_name(field), source, _masked(field, getattr(settings, field))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
