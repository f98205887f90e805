"""Batch lines that used to break a batch (issue 26, H2 and M3): a value only
the output could refuse, a line no file can hold, and the connection a 500
left behind.  The live gateway (real Redis, real Dask cluster), driven by the
official ``openai`` client where it fits."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlparse

from gwtools import serve


def test_a_500_keeps_the_connection(gw_settings: Any) -> None:
    """An error no handler takes is a 500 with a request id, and the client's next request on the same
    kept-alive connection is answered (uvicorn closed it after Starlette raised again)."""
    from starlette.routing import Route

    async def boom(request: Any) -> Any:
        raise RuntimeError("an error no handler takes")

    with serve(gw_settings, routes=[Route("/test/boom", boom)]) as url:
        where = urlparse(url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        conn.request("GET", "/test/boom")
        first = conn.getresponse()
        body = json.loads(first.read())
        assert first.status == 500 and body["error"]["code"] == "internal" and body["error"]["request_id"]
        sock = conn.sock
        conn.request("GET", "/health/live")
        second = conn.getresponse()
        second.read()
        assert second.status == 200 and conn.sock is sock
        conn.close()
