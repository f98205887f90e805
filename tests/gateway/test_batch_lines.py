"""Batch lines that used to break a batch (issue 26, H2 and M3): a value only
the output could refuse, a line no file can hold, and the connection a 500
left behind.  The live gateway (real Redis, real Dask cluster), driven by the
official ``openai`` client where it fits."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gwtools import auth, get_json, new_user, serve, wait_for
from test_openai import MODEL, by_custom_id, client, finished, jsonl, line, upload

from bitinglip.gateway.openai.batchfile import INPUT, check_embeddings
from bitinglip.gateway.openai.finalize import write_files
from bitinglip.platform.jobs import new_job_id

openai = pytest.importorskip("openai", reason="the official openai client is not installed (the dev extra pins it)")

#: tiny-encoder's hidden_size (tests/tiny_models.py): its embeddings' width
WIDTH = 32


def test_dimensions_past_the_models_width_is_that_lines_error(gateway: str, models: dict[str, str]) -> None:
    """H2: the batch completes, its 20 good lines are delivered, the bad one is in the error file, and every
    read of the batch and of the listing answers."""
    oai = client(gateway, new_user("lines-dims"))
    lines = [line(f"ok{i}", {"model": MODEL, "input": f"text {i}", "encoding_format": "float",
                             **({"dimensions": WIDTH} if i % 5 == 0 else {})}) for i in range(20)]
    lines.insert(7, line("too-wide", {"model": MODEL, "input": "text", "dimensions": 1000}))
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/embeddings",
                               completion_window="24h")
    done = finished(oai, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (20, 1)
    out, err = by_custom_id(jsonl(oai, done.output_file_id)), by_custom_id(jsonl(oai, done.error_file_id))
    assert set(out) == {f"ok{i}" for i in range(20)} and set(err) == {"too-wide"}
    assert all(len(r["response"]["body"]["data"][0]["embedding"]) == WIDTH for r in out.values())
    refused = err["too-wide"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "dimensions"
    assert "line 8" in refused["body"]["error"]["message"] and "1000" in refused["body"]["error"]["message"]
    assert oai.batches.retrieve(batch.id).status == "completed"
    assert batch.id in [b.id for b in oai.batches.list()]


def test_a_line_refused_only_when_the_files_are_written_is_that_lines_error(
        models: dict[str, str], platform: Any, tmp_path: Path) -> None:
    """Where the gateway cannot read the model's config, ``dimensions`` is checked as the output is written,
    line by line; and a row that fails as the job runs lands in the error file under its custom_id."""
    out_dir = str(tmp_path / "job")
    lines = [line(f"ok{i}", {"model": MODEL, "input": f"text {i}"}) for i in range(20)]
    lines.insert(3, line("too-wide", {"model": MODEL, "input": "text", "dimensions": 1000}))
    lines.append(line("fails-at-run", {"model": MODEL, "input": "text"}))
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with src.open("rb") as fh:  # no width: the gateway cannot see the model
        checked = check_embeddings(fh, out_dir, "/v1/embeddings", 100, 1000)
    assert not checked.errors and checked.rejected == 0 and checked.rows == 22
    # a row the job refuses as it runs (the batch check never lets one through: written here by hand)
    table = pq.read_table(os.path.join(out_dir, INPUT)).to_pylist()
    table[-1]["text"] = None
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(os.path.join(out_dir, INPUT))),
                   os.path.join(out_dir, INPUT))
    job_id = new_job_id()
    platform.submit("embed", model=MODEL, inputs=os.path.join(out_dir, INPUT), output=out_dir, job_id=job_id,
                    input_root=out_dir).result()
    outcome = write_files(out_dir, job_id, "/v1/embeddings", MODEL, str(tmp_path / "out.jsonl"),
                          str(tmp_path / "err.jsonl"), ("batch_failed", "never ran"))
    assert (outcome.completed, outcome.failed) == (20, 2)
    read = [(tmp_path / name).read_text().splitlines() for name in ("out.jsonl", "err.jsonl")]
    out, err = (by_custom_id([json.loads(x) for x in rows]) for rows in read)
    assert set(out) == {f"ok{i}" for i in range(20)} and set(err) == {"too-wide", "fails-at-run"}
    wide = err["too-wide"]["response"]
    assert wide["status_code"] == 400 and wide["body"]["error"]["param"] == "dimensions"
    assert "line 4" in wide["body"]["error"]["message"] and "1000" in wide["body"]["error"]["message"]
    failed = err["fails-at-run"]["response"]
    assert failed["status_code"] == 500 and "fails-at-run" in failed["body"]["error"]["message"]


def test_a_finished_jobs_unreadable_output_fails_the_batch_not_its_reads(gateway: str, gw_settings: Any,
                                                                        models: dict[str, str]) -> None:
    """A job's output that cannot be read back (here a part file overwritten once the job ended) fails the
    batch, saying so; the batch and the listing stay readable."""
    sub = new_user("lines-unreadable")
    oai = client(gateway, sub)
    lines = [line(f"r{i}", {"model": MODEL, "input": f"text {i}"}) for i in range(3)]
    batch = oai.batches.create(input_file_id=upload(oai, lines).id, endpoint="/v1/embeddings",
                               completion_window="24h")
    job_id = batch.id.removeprefix("batch_")
    # followed as the REST job it is: a read of the batch would write its files as soon as the job ends
    job = wait_for(lambda: get_json(f"{gateway}/v1/jobs/{job_id}", auth(sub)))
    assert job["state"] == "succeeded", job
    (Path(gw_settings.results_dir) / job_id / "part-00000.parquet").write_bytes(b"not parquet")
    for _ in range(2):
        failed = oai.batches.retrieve(batch.id)
        assert failed.status == "failed" and [e.code for e in failed.errors.data] == ["finalize_failed"]
    assert batch.id in [b.id for b in oai.batches.list()]


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
