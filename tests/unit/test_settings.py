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


def test_config_prints_each_value_and_its_source_with_secrets_masked(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bitinglip import cli
    from bitinglip.settings import get_settings

    for name in ("MAX_WORKERS", "REDIS_URL", "BITINGLIP_JWT_SECRET", "BITINGLIP_RATE_LIMIT", "BITINGLIP_TOKEN_BUDGET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MAX_WORKERS", "3")
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@db:6379/0")
    monkeypatch.setenv("BITINGLIP_JWT_SECRET", "s3cret-value")
    monkeypatch.setenv("BITINGLIP_RATE_LIMIT", "5/second")
    get_settings.cache_clear()
    try:
        assert cli.main(["config"]) == 0
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:]}
    assert rows["MAX_WORKERS"][2:] == ["environment", "3"]
    assert rows["BITINGLIP_RATE_LIMIT"][2:] == ["environment", "5/second"]
    assert rows["BITINGLIP_TOKEN_BUDGET"][2:] == ["default", "0"]
    assert rows["REDIS_URL"][3] == "redis://:***@db:6379/0"
    assert rows["BITINGLIP_JWT_SECRET"][3] == "***"
    assert "hunter2" not in out and "s3cret-value" not in out
    # every setting has its row, except the test-only ones the environment never sets
    assert len(rows) == len(Settings.model_fields) - 1 and "BITINGLIP_FAULT_OOM_ABOVE_TOKENS" not in rows


def test_help_names_only_real_variables() -> None:
    """`run --help` once named PARTITION_ROWS and TOKEN_BUDGET, variables that nothing reads."""
    import argparse
    import re

    from bitinglip.cli import build_parser
    from bitinglip.settings import env_name

    variables = {env_name(field) for field in Settings.model_fields}
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    named = {}
    for command, sub in commands.items():
        # another option's value (`--log-format`'s help points into RUN_DIR) is fine; an option's own is not:
        # "--partition-rows PARTITION_ROWS ... (default: PARTITION_ROWS)" reads as a variable
        metavars = {a.metavar if isinstance(a.metavar, str) else a.dest.upper(): a for a in sub._actions}
        for action in sub._actions:
            for word in re.findall(r"(?<![A-Za-z_])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+", action.help or ""):
                if metavars.get(word, action) is action:
                    named[word] = f"{command} {'/'.join(action.option_strings)}"
    assert {w: where for w, where in named.items() if w not in variables} == {}
    run_help = commands["run"].format_help().replace("\n", " ")
    assert "BITINGLIP_PARTITION_ROWS" in run_help and "BITINGLIP_TOKEN_BUDGET" in run_help


def test_deployment_timeouts_are_settings_and_reach_what_they_bound() -> None:
    from bitinglip.cli import build_parser
    from bitinglip.gateway.serve import server

    s = Settings.from_env({"BITINGLIP_INFER_TIMEOUT": "600", "BITINGLIP_SHUTDOWN_GRACE": "25",
                           "BITINGLIP_MODEL_LOOKUP_TIMEOUT": "30", "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert (s.infer_timeout_s, s.shutdown_grace_s, s.model_lookup_timeout_s) == (600, 25, 30)
    assert server(build_parser().parse_args(["gateway"]), s).config.timeout_graceful_shutdown == 25
    with pytest.raises(ConfigError, match="BITINGLIP_INFER_TIMEOUT='0'"):
        Settings.from_env({"BITINGLIP_INFER_TIMEOUT": "0"})


def test_settings_built_in_code_take_the_environment_under_what_they_are_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings' rule; from_env(mapping) reads only the mapping, and with_ never the environment."""
    monkeypatch.setenv("BITINGLIP_KV_CACHE_BYTES", "1234")
    monkeypatch.setenv("MAX_WORKERS", "7")
    monkeypatch.setenv("BITINGLIP_FAULT_OOM_ABOVE_TOKENS", "5")  # tests only: never from the environment
    s = Settings(max_workers=2)
    assert (s.kv_cache_bytes, s.max_workers, s.fault_oom_above_tokens) == (1234, 2, 0)
    assert Settings.from_env({}).kv_cache_bytes == 0
    assert Settings.from_env({}).with_(token_budget=9).max_workers is None


def test_the_readme_table_of_variables_is_the_generated_one() -> None:
    from bitinglip.settings import markdown_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    begin = readme.index("\n", readme.index("<!-- settings table:")) + 1
    assert readme[begin:readme.index("<!-- end of settings table -->")] == markdown_table(), \
        "the README's settings table is stale: paste `bitinglip config --markdown` over it"
