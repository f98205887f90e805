"""Can this machine reach ``host:port``?  Answered within a deadline.

``getaddrinfo`` has no timeout of its own: on a machine whose resolver
cannot reach a DNS server it retries for about 20 s, and callers such as
Dask's connect (30 s) or the hub client (retries) wait longer still before
a bare ``OSError``.  Checking first turns that into a clear error at once.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

DEADLINE_S = 5.0


def unreachable(host: str, port: int, timeout: float = DEADLINE_S, connect: bool = True) -> str | None:
    """Why ``host:port`` cannot be reached (resolved, and with ``connect``
    a TCP connection opened, each within ``timeout`` s), or None if it can."""
    found: list[Any] = []

    def resolve() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    resolver = threading.Thread(target=resolve, daemon=True)
    resolver.start()
    resolver.join(timeout)
    if not found:
        return f"the host {host!r} does not resolve: no answer from the resolver within {timeout:.0f} s"
    if isinstance(found[0], OSError):
        return f"the host {host!r} does not resolve ({found[0]})"
    if connect:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as exc:
            return f"cannot connect to {host}:{port} ({exc})"
    return None
