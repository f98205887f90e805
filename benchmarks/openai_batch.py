"""A 10,000-line embeddings batch file through the gateway's OpenAI API,
against the same rows through ``platform.submit``: lines per second each way.

Starts what it needs (a redis-server, an embedded Dask cluster, a ``bitinglip
gateway`` process on it).  The gateway figure runs from ``files.create`` to
the output file read back (upload, file check, the job, the output and error
files written, the download); the Python figure from ``submit`` to
``result()``.  Both run after one warm-up job, so the model is loaded.  Prints
one JSON line.

    python benchmarks/openai_batch.py --lines 10000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

from gateway_load import gateway_stack


def batch_lines(n: int, model: str, bad_every: int) -> tuple[list[str], list[str]]:
    texts = [f"line {i}: a review of the product, number {i % 97}" for i in range(n)]
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": model, "input": 7 if bad_every and i % bad_every == 0 else text}})
             for i, text in enumerate(texts)]
    return lines, texts


def through_gateway(base: str, token: str, lines: list[str]) -> tuple[float, int, int]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=600)
    started = time.perf_counter()
    uploaded = client.files.create(file=("bench.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled"):
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    out = client.files.content(batch.output_file_id).text.count("\n") if batch.output_file_id else 0
    err = client.files.content(batch.error_file_id).text.count("\n") if batch.error_file_id else 0
    return time.perf_counter() - started, out, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--bad-every", type=int, default=100, help="one line in this many has a bad body (0: none)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    args = parser.parse_args()

    with gateway_stack(args.workers) as (platform, base, token):
        lines, texts = batch_lines(args.lines, args.model, args.bad_every)
        platform.submit("embed", reuse=False, model=args.model, inputs=texts[:64]).result()  # warm: the model loads once
        started = time.perf_counter()
        rows = len(platform.submit("embed", reuse=False, model=args.model, inputs=texts).result())
        python_s = time.perf_counter() - started
        gateway_s, out, err = through_gateway(base, token, lines)
        assert out + err == args.lines, (out, err)
        print(json.dumps({"lines": args.lines, "bad_lines": err, "workers": args.workers, "cpus": os.cpu_count(),
                          "gateway_lines_per_s": round(args.lines / gateway_s, 1),
                          "python_rows_per_s": round(rows / python_s, 1),
                          "ratio": round((args.lines / gateway_s) / (rows / python_s), 3),
                          "gateway_s": round(gateway_s, 2), "python_s": round(python_s, 2)}))


if __name__ == "__main__":
    main()
