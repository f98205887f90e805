"""Issue 13, "the first hour": what a new user following the README meets
first — the example as a script, the demo run twice, `bitinglip up` after
`down`, CLI errors before a cluster starts, and the smaller rough edges."""

from __future__ import annotations

import socket

from bitinglip.platform.settings import Settings
from bitinglip.platform.stack import _jwt_secret, port_free


def test_a_port_in_time_wait_is_free_for_up() -> None:
    """`up` right after `down`: the old connections of a port linger in
    TIME_WAIT for about 60 s; the servers bind with SO_REUSEADDR, so the
    check must too."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
        client.close()
    assert port_free("127.0.0.1", port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert not port_free("127.0.0.1", busy.getsockname()[1])


def test_up_signs_with_an_exported_secret() -> None:
    assert _jwt_secret(Settings(jwt_secret="exported-secret")) == "exported-secret"
    fresh = _jwt_secret(Settings(jwt_secret=None))
    assert len(fresh) >= 32 and fresh != _jwt_secret(Settings(jwt_secret=None))
