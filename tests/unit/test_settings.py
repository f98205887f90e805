from pathlib import Path

import pytest

from bitinglip.errors import ConfigError
from bitinglip.settings import Settings


def test_defaults_when_environment_is_empty() -> None:
    s = Settings.from_env({})
    assert s.environment == "development"
    assert s.redis_url is None
    assert s.max_workers is None
    assert 0 < s.gpu_memory_fraction <= 1


def test_reads_the_seed_variables() -> None:
    s = Settings.from_env({"ENVIRONMENT": "production", "REDIS_URL": "redis://h:6379/0",
                           "MODEL_CACHE_DIR": "/data/models", "GPU_MEMORY_FRACTION": "0.8", "MAX_WORKERS": "4"})
    assert (s.environment, s.redis_url, s.model_cache_dir, s.gpu_memory_fraction, s.max_workers) == (
        "production", "redis://h:6379/0", Path("/data/models"), 0.8, 4)


@pytest.mark.parametrize("name,value", [
    ("ENVIRONMENT", "staging"), ("REDIS_URL", "localhost:6379"), ("GPU_MEMORY_FRACTION", "1.5"),
    ("GPU_MEMORY_FRACTION", "abc"), ("MAX_WORKERS", "0"), ("MAX_WORKERS", "two"),
    ("BITINGLIP_TOKEN_BUDGET", "-1"),
])
def test_invalid_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.max_workers = 3  # type: ignore[misc]
    assert s.with_(max_workers=3).max_workers == 3 and s.max_workers is None


def test_cli_stops_on_invalid_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bitinglip import cli
    from bitinglip.settings import get_settings

    monkeypatch.setenv("MAX_WORKERS", "-3")
    get_settings.cache_clear()
    try:
        code = cli.main(["run", "--task", "embed", "--model", "m", "--input", "x.parquet"])
    finally:
        get_settings.cache_clear()
    assert code == 2
    assert "MAX_WORKERS" in capsys.readouterr().err


def test_dask_tls_needs_all_three_files(tmp_path) -> None:
    from bitinglip.errors import ConfigError
    from bitinglip.settings import Settings

    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="missing BITINGLIP_TLS_CERT, BITINGLIP_TLS_KEY"):
        Settings.from_env({"BITINGLIP_TLS_CA_FILE": str(pem)})
    with pytest.raises(ConfigError, match="BITINGLIP_TLS_KEY=.*no such file"):
        Settings.from_env({"BITINGLIP_TLS_KEY": str(tmp_path / "nope.pem")})
    settings = Settings.from_env({"BITINGLIP_TLS_CA_FILE": str(pem), "BITINGLIP_TLS_CERT": str(pem),
                                  "BITINGLIP_TLS_KEY": str(pem)})
    assert settings.tls and not Settings.from_env({}).tls


def test_tls_and_the_scheduler_address_must_agree(tmp_path) -> None:
    from bitinglip.errors import ConfigError
    from bitinglip.platform.cluster.tls import check_address, dask_cli_arguments, security
    from bitinglip.settings import Settings

    plain = Settings.from_env({})
    with pytest.raises(ConfigError, match="TLS address"):
        check_address(plain, "tls://10.0.0.1:8786")
    check_address(plain, "tcp://10.0.0.1:8786")
    assert security(plain) is None and dask_cli_arguments(plain) == []
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    tls = Settings.from_env({"BITINGLIP_TLS_CA_FILE": str(pem), "BITINGLIP_TLS_CERT": str(pem),
                             "BITINGLIP_TLS_KEY": str(pem)})
    with pytest.raises(ConfigError, match="must be tls://"):
        check_address(tls, "tcp://10.0.0.1:8786")
    assert dask_cli_arguments(tls)[:2] == ["--tls-ca-file", str(pem)]
