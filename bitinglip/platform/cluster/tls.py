"""Dask's TLS for BitingLip: one place that turns the settings (or the
``--tls-*`` options of the production commands) into what Dask wants.

With a CA, a certificate and a key, the scheduler listens on ``tls://``,
workers and clients present certificates that the CA signed, and nothing
unencrypted is accepted (``require_encryption``).  Without them everything
stays ``tcp://``.
"""

from __future__ import annotations

import argparse
from typing import Any

from bitinglip.errors import ConfigError
from bitinglip.settings import Settings, _pem_file

_OPTIONS = (("tls_ca_file", "--tls-ca-file", "CA certificate (PEM) that signed every Dask host's certificate"),
            ("tls_cert", "--tls-cert", "this host's certificate (PEM)"),
            ("tls_key", "--tls-key", "this host's private key (PEM)"))


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca-file``, ``--tls-cert``, ``--tls-key`` (default: BITINGLIP_TLS_*)."""
    for _field, flag, text in _OPTIONS:
        parser.add_argument(flag, help=f"{text}; default BITINGLIP_{flag[2:].upper().replace('-', '_')}")


def settings_with_tls(settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings with any ``--tls-*`` options of the command line applied."""
    changes: dict[str, Any] = {}
    for field, flag, _text in _OPTIONS:
        raw = getattr(args, field, None)
        if raw:
            try:
                changes[field] = _pem_file(raw)
            except ValueError as exc:
                raise ConfigError(f"{flag} {raw}: {exc}") from None
    settings = settings.with_(**changes) if changes else settings
    settings.check_tls(*(flag for _f, flag, _t in _OPTIONS))
    return settings


def security(settings: Settings) -> Any:
    """A ``distributed.Security`` for a client or a worker, or None without TLS."""
    if not settings.tls:
        return None
    from distributed.security import Security

    ca, cert, key = str(settings.tls_ca_file), str(settings.tls_cert), str(settings.tls_key)
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key, require_encryption=True)


def dask_cli_arguments(settings: Settings) -> list[str]:
    """The ``dask scheduler`` / ``dask worker`` options for the same TLS."""
    if not settings.tls:
        return []
    return ["--tls-ca-file", str(settings.tls_ca_file), "--tls-cert", str(settings.tls_cert),
            "--tls-key", str(settings.tls_key)]


def check_address(settings: Settings, address: str) -> None:
    """A clear error instead of a hang when the address and TLS disagree."""
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if settings.tls and scheme != "tls":
        raise ConfigError(f"TLS is configured, so the scheduler address must be tls://...; got {address!r}")
    if scheme == "tls" and not settings.tls:
        raise ConfigError(f"{address!r} is a TLS address: give BITINGLIP_TLS_CA_FILE, BITINGLIP_TLS_CERT "
                          "and BITINGLIP_TLS_KEY (or --tls-ca-file, --tls-cert, --tls-key)")
