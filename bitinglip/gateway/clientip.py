"""The caller's address, and the admin allowlist.

``X-Forwarded-For`` is believed only when the connection comes from a
trusted proxy; then the caller is the rightmost address in it that is not a
trusted proxy itself (the leftmost entries are whatever the client wrote).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.requests import HTTPConnection

from bitinglip.errors import ForbiddenError
from bitinglip.settings import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def client_address(conn: HTTPConnection, trusted_proxies: Sequence[Network]) -> Address | None:
    peer = _parse(conn.client.host) if conn.client else None
    if peer is None or not _within(peer, trusted_proxies):
        return peer
    hops = [h for part in conn.headers.getlist("x-forwarded-for") for h in part.split(",")]
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            return peer  # a malformed chain: trust nothing in it
        if not _within(address, trusted_proxies):
            return address
    return peer


def check_allowlist(conn: HTTPConnection, allowlist: Sequence[Network], trusted_proxies: Sequence[Network]) -> None:
    address = client_address(conn, trusted_proxies)
    if address is None or not _within(address, allowlist):
        raise ForbiddenError(f"admin routes are not open to {address or 'this address'}")
