"""Batch lines that used to break a batch (issue 26, H2 and M3): a value only
the output could refuse, a line no file can hold, and the connection a 500
left behind.  The live gateway (real Redis, real Dask cluster), driven by the
official ``openai`` client where it fits."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from gwtools import new_user, serve
from test_openai import MODEL, by_custom_id, client, finished, jsonl, line, upload

from bitinglip.gateway.openai.batchfile import INPUT

openai = pytest.importorskip("openai", reason="the official openai client is not installed (the dev extra pins it)")


def _no_orphans(results_dir: Path) -> list[str]:
    """Job folders with a batch's input but no batch record: what a failed creation left behind."""
    return [p.name for p in results_dir.iterdir()
            if (p / INPUT).exists() and not (p / "_openai_batch.json").exists()]


def test_lines_no_file_can_hold_fail_the_batch_naming_them(gateway: str, gw_settings: Any,
                                                           models: dict[str, str]) -> None:
    """M3: a lone surrogate in a custom_id, a line nested 100k deep, a body nested 5,000 (or 40) deep: the
    batch fails naming the line; nothing is left behind; a lone surrogate inside a body is that line's
    error."""
    oai = client(gateway, new_user("lines-m3"))
    good = line("good", {"model": MODEL, "input": "fine"})
    head = '{"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny-encoder", ' \
           '"input": "x", "user": '
    cases = [("invalid_custom_id", line("\ud800", {"model": MODEL, "input": "x"})),
             ("invalid_json_line", "[" * 100_000 + "]" * 100_000),
             ("invalid_json_line", head + "[" * 5000 + "]" * 5000 + "}}"),  # past the parser's stack
             ("invalid_json_line", head + "[" * 40 + "]" * 40 + "}}")]  # past the request bodies' bound
    for code, bad in cases:
        batch = oai.batches.create(input_file_id=upload(oai, [good, bad]).id, endpoint="/v1/embeddings",
                                   completion_window="24h")
        assert batch.status == "failed", batch
        assert [(e.line, e.code) for e in batch.errors.data] == [(2, code)]
        assert "line 2" in batch.errors.data[0].message
        assert oai.batches.retrieve(batch.id).status == "failed"
    assert not _no_orphans(Path(gw_settings.results_dir))
    mixed = [good, line("odd", {"model": MODEL, "input": "x", "user": ["a", "b\udc00"]})]
    batch = oai.batches.create(input_file_id=upload(oai, mixed).id, endpoint="/v1/embeddings",
                               completion_window="24h")
    done = finished(oai, batch.id)
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    refused = by_custom_id(jsonl(oai, done.error_file_id))["odd"]["response"]["body"]["error"]
    assert refused["param"] == "body.user[1]" and "line 2" in refused["message"]


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
