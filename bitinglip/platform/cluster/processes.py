"""Process groups: how the local stack starts and stops its services.

Each service starts in a session (and so a process group) of its own;
stopping a service signals its whole group, so the processes it started
(a nanny's worker, multiprocessing helpers) go with it.  Pids get reused:
before signalling from a state file, check that the process is one of ours.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from bitinglip.polling import poll

#: seconds each service gets to stop on SIGTERM before SIGKILL
GRACE_S = 10.0


def alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's group reusing the id
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_groups(groups: dict[str, int], procs: dict[str, subprocess.Popen[bytes]] | None = None,
                grace_s: float = GRACE_S) -> None:
    """Stop services in the reverse order of their start, each with its whole group."""
    for name, pgid in reversed(list(groups.items())):
        _stop_group(pgid, procs.get(name) if procs else None, grace_s)


def _stop_group(pgid: int, leader: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM, and SIGKILL for a group still there after ``grace_s``."""
    _signal_group(pgid, signal.SIGTERM)

    def gone() -> bool:
        if leader is not None:
            leader.poll()  # reap the leader, or its zombie keeps the group alive
        return not alive(pgid)

    if not poll(gone, timeout=grace_s, interval=0.1):
        _signal_group(pgid, signal.SIGKILL)
        if leader is not None:
            leader.wait(5)
        # SIGKILL is not instant: return once the group is gone
        poll(lambda: not alive(pgid), timeout=5, interval=0.05)


def members(pgid: int) -> list[int]:
    import psutil

    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                out.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def ours(pid: int) -> bool:
    """Whether ``pid`` runs one of the stack's programs (pids get reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().decode(errors="replace")
    except OSError:
        return False
    return any(name in cmdline for name in ("bitinglip", "redis-server", "dask", "multiprocessing"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    try:  # a zombie (our child in a test) is gone for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def supervise(commands: list[tuple[list[str], dict[str, str]]], restart: bool = True,
              backoff_s: tuple[float, float] = (1.0, 30.0), log: Any = None) -> int:
    """Run ``commands`` (argv, environment) and start each again when it
    exits, until this process gets SIGTERM or SIGINT, which go on to them.

    A ``dask worker`` closes itself when it loses its scheduler (a network
    cut, a scheduler restart): restarted, it waits for the scheduler and
    joins again.  Restarts back off from ``backoff_s[0]`` to ``backoff_s[1]``
    seconds and reset once a run lasted a minute.  ``restart=False``: return
    when the first command exits, with its status.
    """
    import sys

    log = log or sys.stderr
    stopping: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    procs = [subprocess.Popen(argv, env=env) for argv, env in commands]
    started = [time.monotonic()] * len(procs)
    delays = [backoff_s[0]] * len(procs)
    due: dict[int, float] = {}
    try:
        while True:
            if stopping:
                for proc in procs:
                    proc.wait()
                return 0
            for i, proc in enumerate(procs):
                code = proc.poll()
                if code is None or i in due:
                    continue
                if not restart:
                    return code
                if time.monotonic() - started[i] > 60.0:
                    delays[i] = backoff_s[0]
                due[i] = time.monotonic() + delays[i]
                print(f"bitinglip worker: dask worker exited with {code}; "
                      f"starting it again in {delays[i]:.0f}s", file=log, flush=True)
                delays[i] = min(backoff_s[1], delays[i] * 2)
            for i, when in list(due.items()):
                if time.monotonic() >= when and not stopping:
                    procs[i] = subprocess.Popen(commands[i][0], env=commands[i][1])
                    started[i] = time.monotonic()
                    del due[i]
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
