"""Command-line entries of the gateway (``bitinglip gateway``, ``bitinglip token``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bitinglip.platform.cluster import DEFAULT_RUN_DIR


def server(args: argparse.Namespace, settings: Any = None) -> Any:
    """A ``uvicorn.Server`` for the gateway (the tests start it in a thread)."""
    import uvicorn

    from bitinglip.errors import ConfigError
    from bitinglip.gateway.app import create_app
    from bitinglip.gateway.protocol import protocol
    from bitinglip.settings import get_settings

    settings = settings or get_settings()
    if args.scheduler:
        settings = settings.with_(scheduler_address=args.scheduler)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ConfigError("--ssl-certfile and --ssl-keyfile go together")
    tls = bool(args.ssl_certfile)
    log_format = getattr(args, "log_format", "text")
    if log_format == "json":
        from bitinglip.logs import configure

        configure("json")
    app = create_app(settings, tls=tls)
    # proxy_headers off: uvicorn's own would trust 127.0.0.1; the app applies BITINGLIP_TRUSTED_PROXIES itself
    config = uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                            ssl_keyfile=args.ssl_keyfile, proxy_headers=False, server_header=False,
                            log_level=args.log_level, access_log=args.access_log, lifespan="on",
                            # then requests in flight are cancelled.  Without a bound uvicorn waits for every
                            # request task, and one awaiting the cluster for a caller that has gone (no
                            # connection left open) kept the gateway up through two SIGTERMs
                            timeout_graceful_shutdown=settings.shutdown_grace_s,
                            # a slow request head is cut off, an idle kept-alive connection closes,
                            # an endless header block is refused
                            http=protocol(settings.header_timeout_s), timeout_keep_alive=settings.keep_alive_s,
                            h11_max_incomplete_event_size=settings.max_header_bytes,
                            # json: uvicorn's loggers go through the JSON handler instead of its own
                            log_config=None if log_format == "json" else uvicorn.config.LOGGING_CONFIG)
    return uvicorn.Server(config)


def cmd_gateway(args: argparse.Namespace) -> int:
    from bitinglip.errors import ConfigError
    from bitinglip.platform.cluster import port_free

    if not port_free(args.host, args.port):  # before anything starts or prints a token
        raise ConfigError(f"--port {args.port}: in use on {args.host}; stop what listens there or choose another "
                          "--port")
    srv = server(args)
    srv.run()
    return 0 if srv.started else 1


def cmd_token(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bitinglip.errors import ConfigError
    from bitinglip.gateway.auth import mint
    from bitinglip.platform.cluster import running_secret
    from bitinglip.settings import get_settings

    scopes = [s for part in args.scope for s in part.replace(",", " ").split()]
    private_key = Path(args.private_key).read_text() if args.private_key else None
    settings = get_settings()
    if private_key is None and not settings.jwt_secret and not settings.jwt_public_key:
        # no secret here: a throwaway one would sign tokens no gateway accepts ("Signature verification failed")
        run_dir = Path(args.run_dir).expanduser().resolve()
        secret = running_secret(run_dir)
        if secret is None:
            raise ConfigError(f"BITINGLIP_JWT_SECRET is not set and no `bitinglip up` stack is running from {run_dir}; "
                              "export the secret your gateway was started with, or name the stack's --run-dir")
        settings = settings.with_(jwt_secret=secret)
    print(mint(settings, args.sub, scopes, ttl_s=args.ttl, private_key=private_key))
    sys.stdout.flush()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the gateway's subcommands to the ``bitinglip`` parser."""
    gateway = sub.add_parser("gateway", help="serve the REST API (needs REDIS_URL)")
    gateway.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    gateway.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    gateway.add_argument("--scheduler", help="Dask scheduler address (default: BITINGLIP_SCHEDULER, "
                                             "else an embedded local cluster)")
    gateway.add_argument("--ssl-certfile", help="TLS certificate (PEM)")
    gateway.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    gateway.add_argument("--log-level", default="info", help="uvicorn's log level (default: %(default)s)")
    gateway.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                         help="log every request (default: on)")
    gateway.add_argument("--log-format", choices=("text", "json"), default="text",
                         help="json: one JSON object per log line, with the request id")
    gateway.set_defaults(func=cmd_gateway)

    token = sub.add_parser("token", help="print a signed JWT for the gateway (development)")
    token.add_argument("--sub", required=True, help="the subject (user) the token speaks for")
    token.add_argument("--scope", action="append", required=True,
                       help="jobs:read, jobs:write or admin; repeat or separate with spaces/commas")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (default 3600)")
    token.add_argument("--private-key", help="sign RS256 with this PEM private key instead of the HS256 secret")
    token.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR),
                       help="without BITINGLIP_JWT_SECRET: sign with the secret of the `bitinglip up` stack running "
                            "from this folder (default: %(default)s)")
    token.set_defaults(func=cmd_token)
