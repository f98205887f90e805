"""Several hosts on this one machine: Linux network namespaces joined by
veth pairs to a bridge that lives in a namespace of its own, so every packet
stays inside these namespaces (and their loopbacks).

    net = Network("bl1234")
    core = net.add_host("core")            # 10.77.0.1
    proc = core.start(["redis-server", ...], log)
    net.cut(core); net.restore(core)      # the host's cable out and back in
    net.close()

Commands run with ``ip netns exec``; :meth:`Host.call` runs a Python
function on a thread that has entered the host's namespace (for HTTP
clients in the test process).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"


def missing() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "building network namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    probe = f"blprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"`ip netns add` fails here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Host:
    def __init__(self, network: Network, name: str, index: int) -> None:
        self.network, self.name, self.index = network, name, index
        self.ns = f"{network.tag}-{name}"
        self.address = f"{SUBNET}.{index}"
        self.port_name = f"p{index}"  # the switch's side of this host's cable
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``argv`` inside this host, in a process group of its own."""
        with log.open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a thread inside this host's network."""
        box: dict[str, Any] = {}

        def run() -> None:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    box["error"] = OSError(ctypes.get_errno(), f"setns into {self.ns}")
                    return
            finally:
                os.close(fd)
            try:
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"in-{self.ns}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        self.procs.clear()


class Network:
    """A switch namespace with a bridge; hosts plug into it."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.switch = f"{tag}-sw"
        self.hosts: dict[str, Host] = {}
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        ip("-n", self.switch, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        host = Host(self, name, len(self.hosts) + 1)
        ip("netns", "add", host.ns)
        # both ends of the cable are made straight inside their namespaces
        ip("link", "add", "eth0", "netns", host.ns, "type", "veth", "peer", "name", host.port_name,
           "netns", self.switch)
        ip("-n", self.switch, "link", "set", host.port_name, "master", "br0")
        ip("-n", self.switch, "link", "set", host.port_name, "up")
        ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.ns, "link", "set", "eth0", "up")
        ip("-n", host.ns, "link", "set", "lo", "up")
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Pull the host's cable at the switch: its processes keep running."""
        ip("-n", self.switch, "link", "set", host.port_name, "down")

    def restore(self, host: Host) -> None:
        ip("-n", self.switch, "link", "set", host.port_name, "up")

    def close(self) -> None:
        for host in reversed(list(self.hosts.values())):
            host.stop()
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True, check=False)
