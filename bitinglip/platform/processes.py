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
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if procs and name in procs:
                procs[name].poll()  # reap the leader, or its zombie keeps the group alive
            if not alive(pgid):
                break
            time.sleep(0.1)
        else:
            _signal_group(pgid, signal.SIGKILL)
            if procs and name in procs:
                procs[name].wait(5)
            deadline = time.monotonic() + 5  # SIGKILL is not instant: return once the group is gone
            while alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)


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
