"""The local stack (``bitinglip up`` / ``bitinglip down``) and the
scheduler service (``bitinglip scheduler``).

``up`` starts, each in a process group of its own: a real ``redis-server``
from PATH, ``bitinglip scheduler`` (Dask's scheduler with the dashboard,
the Jobs page and the Redis status plugin), ``bitinglip worker``
(``MAX_WORKERS`` workers, one per GPU tagged ``GPU=1`` where there are
GPUs) and ``bitinglip gateway``; it prints where everything is and a
development token, then waits.  Ctrl-C, SIGTERM or ``bitinglip down``
stops every group (SIGTERM, then SIGKILL after a grace period).  What runs
is written to ``RUN_DIR/stack.json`` so that ``down`` finds it from another
shell; each service logs to ``RUN_DIR/NAME.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitinglip.atomic import write_json_atomically
from bitinglip.errors import ConfigError, StackError
from bitinglip.platform.cluster.processes import GRACE_S, alive, members, ours, pid_alive, stop_groups
from bitinglip.platform.cluster.tls import add_tls_arguments
from bitinglip.polling import poll

STATE_FILE = "stack.json"
START_TIMEOUT_S = 180.0
DEFAULT_RUN_DIR = Path.home() / ".cache" / "bitinglip" / "stack"
#: the running stack's JWT secret, in its run directory (mode 0600), for `bitinglip token` in another shell
SECRET_FILE = "jwt-secret"
# the gateway's token minter: mint(settings, sub, scopes, ttl_s=...) -> a signed token
Mint = Callable[..., str]


@dataclass
class Stack:
    run_dir: str
    up_pid: int
    #: service name -> process group id (the leader's pid)
    groups: dict[str, int] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    token: str = ""

    def save(self) -> None:
        write_json_atomically(Path(self.run_dir) / STATE_FILE, asdict(self), indent=1)

    @classmethod
    def load(cls, run_dir: Path) -> Stack | None:
        try:
            return cls(**json.loads((run_dir / STATE_FILE).read_text()))
        except FileNotFoundError:
            return None


def running_secret(run_dir: Path) -> str | None:
    """The HS256 secret of the stack running from ``run_dir`` (None: no stack runs there), so that
    ``bitinglip token`` in another shell signs tokens that stack's gateway accepts."""
    if Stack.load(run_dir) is None:
        return None
    try:
        return (run_dir / SECRET_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def _keep_secret(run_dir: Path, secret: str) -> None:
    """Write the gateway's secret where only this user can read it (mode 0600 from the start)."""
    path = run_dir / SECRET_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now.  SO_REUSEADDR as
    the servers themselves set it: a port whose last connections are in
    TIME_WAIT (for about 60 s after ``bitinglip down``) is free for them."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], name: str, log: Path,
               timeout: float = START_TIMEOUT_S) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    if not poll(listening, timeout=timeout, interval=0.2):
        raise StackError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s; see {log}")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _wait_healthy(url: str, procs: dict[str, subprocess.Popen[bytes]], run_dir: Path, workers: int,
                  timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
    import httpx

    last: Any = None

    def healthy() -> bool:
        nonlocal last
        for name, proc in procs.items():
            if proc.poll() is not None:
                log = run_dir / f"{name}.log"
                raise StackError(f"{name} exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        try:
            r = httpx.get(f"{url}/health", timeout=10)
            last = r.json()
            return r.status_code == 200 and last["components"]["cluster"]["workers"] >= workers
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    if not poll(healthy, timeout=timeout, interval=0.5):
        raise StackError(f"the stack was not healthy within {timeout:.0f}s; last /health: {last}")
    return last  # type: ignore[no-any-return]


def _plan_workers(max_workers: int | None) -> tuple[list[str], int, str]:
    """``bitinglip worker`` arguments, how many workers, and what kind."""
    from bitinglip.platform.cluster.local import cpu_count, gpu_count

    gpus = gpu_count()
    if gpus:
        n = min(max_workers or gpus, gpus)
        return ["--gpus", str(n)], n, "GPU"
    n = max_workers or cpu_count()
    return ["--gpus", "0", "--nworkers", str(n)], n, "CPU"


def cmd_up(args: argparse.Namespace) -> int:
    from bitinglip.logs import dask_env
    from bitinglip.settings import get_settings

    settings = get_settings()
    # the gateway's token minter, given by the CLI (the platform does not import the gateway); loaded
    # before anything starts, so a missing gateway extra stops `up` at once
    mint = args.load_mint()
    run_dir = Path(args.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    existing = Stack.load(run_dir)
    if existing is not None and any(alive(g) for g in existing.groups.values()):
        raise StackError(f"a stack from {run_dir} is running (gateway {existing.urls.get('gateway')}); "
                         f"stop it with `bitinglip down --run-dir {run_dir}`")
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise ConfigError("redis-server is not on PATH (apt-get install redis-server, or scripts/install-services.sh)")
    host = args.host
    ports = {"redis": args.redis_port, "scheduler": args.scheduler_port, "dashboard": args.dashboard_port,
             "gateway": args.gateway_port}
    busy = [f"{name} port {port}" for name, port in ports.items() if not port_free(host, port)]
    if busy:
        raise ConfigError(f"in use on {host}: {', '.join(busy)}; choose other ports (see `bitinglip up --help`)")
    worker_args, n_workers, kind = _plan_workers(args.workers or settings.max_workers)
    secret = _jwt_secret(settings)
    redis_url = f"redis://{host}:{ports['redis']}/0"
    scheduler = f"tcp://{host}:{ports['scheduler']}"
    env = {**os.environ, "REDIS_URL": redis_url, "BITINGLIP_JWT_SECRET": secret, "BITINGLIP_SCHEDULER": scheduler,
           "PYTHONUNBUFFERED": "1"}
    bitinglip = [sys.executable, "-m", "bitinglip"]
    log_format = ["--log-format", args.log_format]
    commands = {
        "redis": [redis_server, "--port", str(ports["redis"]), "--bind", host, "--save", "", "--appendonly", "no",
                  "--dir", str(run_dir)],
        "scheduler": [*bitinglip, "scheduler", "--host", host, "--port", str(ports["scheduler"]),
                      "--dashboard-address", f"{host}:{ports['dashboard']}", *log_format],
        "workers": [*bitinglip, "worker", scheduler, *worker_args],
        "gateway": [*bitinglip, "gateway", "--host", host, "--port", str(ports["gateway"]), "--scheduler", scheduler,
                    *log_format],
    }
    stack = Stack(str(run_dir), os.getpid())
    _keep_secret(run_dir, secret)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    detached = False
    _install_signal_handlers()
    try:
        for name, cmd in commands.items():
            log = run_dir / f"{name}.log"
            with log.open("ab") as out:
                out.write(json.dumps({"event": "stack.start", "service": name, "cmd": cmd}).encode() + b"\n")
                out.flush()
                # the workers are plain `dask worker` processes: their log format comes from Dask's config
                service_env = {**env, **dask_env(args.log_format)} if name == "workers" else env
                procs[name] = subprocess.Popen(cmd, env=service_env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True)
            stack.groups[name] = procs[name].pid
            stack.save()
            if name in ports:
                _wait_port(host, ports[name], procs[name], name, log)
        gateway = f"http://{host}:{ports['gateway']}"
        health = _wait_healthy(gateway, procs, run_dir, n_workers)
        stack.urls = {"redis": redis_url, "scheduler": scheduler, "dashboard": f"http://{host}:{ports['dashboard']}",
                      "jobs_page": f"http://{host}:{ports['dashboard']}/bitinglip/jobs", "gateway": gateway}
        stack.token = mint(settings.with_(jwt_secret=secret), "dev", ["jobs:read", "jobs:write", "admin"],
                           ttl_s=min(86400, settings.jwt_max_ttl_s))
        stack.save()
        _print_summary(stack, health, kind, run_dir)
        if args.detach:
            detached = True
            stack.up_pid = 0  # nothing waits on the services now: `down` signals their groups
            stack.save()
            return 0
        while True:  # until Ctrl-C, SIGTERM (bitinglip down) or a service dies
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise StackError(f"{name} exited with {proc.returncode}; stopping the stack "
                                     f"(see {run_dir / (name + '.log')})")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr, flush=True)
        return 0
    finally:
        if not detached:
            stop_groups(stack.groups, procs)
            (run_dir / STATE_FILE).unlink(missing_ok=True)
            (run_dir / SECRET_FILE).unlink(missing_ok=True)
            print(f"stopped: {', '.join(stack.groups) or 'nothing had started'}", file=sys.stderr, flush=True)


def _jwt_secret(settings: Any) -> str:
    """The gateway's HS256 secret: an exported ``BITINGLIP_JWT_SECRET``, so that
    ``bitinglip token`` from the same shell signs tokens this stack accepts;
    else a fresh one for this stack only."""
    return str(settings.jwt_secret) if settings.jwt_secret else secrets.token_urlsafe(32)


def _install_signal_handlers() -> None:
    """SIGTERM (what ``bitinglip down`` sends) stops the stack like Ctrl-C."""
    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough; let the stop finish
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _print_summary(stack: Stack, health: dict[str, Any], kind: str, run_dir: Path) -> None:
    cluster = health["components"]["cluster"]
    lines = [
        "BitingLip is up (Ctrl-C here, or `bitinglip down`, stops all of it)",
        f"  redis      {stack.urls['redis']}",
        f"  scheduler  {stack.urls['scheduler']}",
        f"  dashboard  {stack.urls['dashboard']}/status",
        f"  jobs page  {stack.urls['jobs_page']}",
        f"  gateway    {stack.urls['gateway']}   (GET /health, /metrics, POST /v1/jobs)",
        f"  workers    {cluster['workers']} {kind} worker(s)",
        f"  logs       {run_dir}/*.log",
        "  token (dev, all scopes, 24h):",
        f"  {stack.token}",
        "",
        f"  curl -H 'Authorization: Bearer {stack.token}' {stack.urls['gateway']}/v1/jobs",
    ]
    print("\n".join(lines), flush=True)


def cmd_down(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).expanduser().resolve()
    stack = Stack.load(run_dir)
    if stack is None:
        print(f"no stack is running from {run_dir}", file=sys.stderr)
        return 0
    if stack.up_pid and ours(stack.up_pid):
        os.kill(stack.up_pid, signal.SIGTERM)  # `up` stops its services and exits
        poll(lambda: not pid_alive(stack.up_pid), timeout=GRACE_S * (len(stack.groups) + 1), interval=0.1)
    # a detached stack, or leftovers of an `up` that was killed; a stale state file must not make us
    # signal a group whose id the system has given to someone else since
    stop_groups({n: g for n, g in stack.groups.items() if alive(g) and any(ours(p) for p in members(g))})
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    (run_dir / SECRET_FILE).unlink(missing_ok=True)
    print(f"stopped: {', '.join(stack.groups)}", file=sys.stderr)
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    """``dask scheduler`` with BitingLip's preload, in this process; its
    other options pass through."""
    from distributed.cli.dask_scheduler import main as dask_scheduler

    from bitinglip.platform.cluster.tls import dask_cli_arguments, settings_with_tls
    from bitinglip.settings import get_settings

    settings = settings_with_tls(get_settings(), args)
    if not port_free(args.host or "0.0.0.0", args.port):  # one line, not Dask's traceback
        raise ConfigError(f"--port {args.port}: in use on {args.host or 'this host'}; stop what listens there "
                          "or choose another --port")
    dashboard = args.dashboard_address or settings.dashboard_address
    tls = ["--protocol", "tls", *dask_cli_arguments(settings)] if settings.tls else []
    argv = [*(["--host", args.host] if args.host else []), "--port", str(args.port),
            "--dashboard-address", dashboard, *tls, *args.dask_args,
            "--preload", "bitinglip.platform.ops.scheduler_preload"]
    if args.log_format == "json":
        from bitinglip.logs import configure

        configure("json")  # before the scheduler logs its first line
    else:
        print("+ dask scheduler", shlex.join(argv), file=sys.stderr, flush=True)
    try:
        dask_scheduler.main(args=argv, prog_name="dask scheduler", standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], load_mint: Callable[[], Mint]) -> None:
    """Add ``up``, ``down`` and ``scheduler`` to the ``bitinglip`` parser.

    ``load_mint()`` returns the gateway's ``mint(settings, sub, scopes, ttl_s=...)``: ``up`` prints a
    development token for the gateway it starts."""
    up = sub.add_parser("up", help="start redis, a scheduler, workers and the gateway here; Ctrl-C stops them")
    up.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="state and logs (default: %(default)s)")
    up.add_argument("--host", default="127.0.0.1", help="address every service listens on (default: %(default)s)")
    up.add_argument("--redis-port", type=int, default=6379, help="default: %(default)s")
    up.add_argument("--scheduler-port", type=int, default=8786, help="default: %(default)s")
    up.add_argument("--dashboard-port", type=int, default=8787,
                    help="the Dask dashboard and the Jobs page (default: %(default)s)")
    up.add_argument("--gateway-port", type=int, default=8000, help="the REST API (default: %(default)s)")
    up.add_argument("--workers", type=int, help="worker processes (default: MAX_WORKERS, else one per GPU or core)")
    up.add_argument("--log-format", choices=("text", "json"), default="text",
                    help="json: one JSON object per log line in RUN_DIR/*.log (default: %(default)s)")
    up.add_argument("--detach", action="store_true", help="return once it is up; `bitinglip down` stops it")
    up.set_defaults(func=cmd_up, load_mint=load_mint)

    down = sub.add_parser("down", help="stop the stack that `bitinglip up` started")
    down.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="the --run-dir `up` was given (default: %(default)s)")
    down.set_defaults(func=cmd_down)

    scheduler = sub.add_parser("scheduler", help="start a Dask scheduler with BitingLip's plugins "
                                                 "(wraps `dask scheduler`)")
    scheduler.add_argument("--host", help="address to listen on (default: all)")
    scheduler.add_argument("--port", type=int, default=8786, help="default: %(default)s")
    scheduler.add_argument("--dashboard-address", help="default: BITINGLIP_DASHBOARD_ADDRESS, else :8787")
    scheduler.add_argument("--log-format", choices=("text", "json"), help="json: one JSON object per log line")
    add_tls_arguments(scheduler)
    scheduler.add_argument("dask_args", nargs=argparse.REMAINDER, help="more `dask scheduler` options")
    scheduler.set_defaults(func=cmd_scheduler)
