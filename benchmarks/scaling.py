"""Scaling with size: rows/s and peak worker memory as the input grows.

Each size is written as a Parquet dataset (one file per 5,000 rows), so the
job reads its partitions on the workers and writes Parquet output: nothing
of the size passes through the client.  Memory should stay flat as the
input grows, since partitions stream through the workers.  One embedded
cluster serves every size, warmed with a small job first; a size's clock
runs from submit to the manifest being written.

    python benchmarks/scaling.py --rows 20000,200000
    python benchmarks/scaling.py --rows 2000,20000      # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import cores, gib

FILE_ROWS = 5000


def write_input(rows: int, seed: int, folder: str) -> str:
    import pandas as pd

    from bitinglip.platform.jobs.sample import sample_corpus

    os.makedirs(folder, exist_ok=True)
    for start in range(0, rows, FILE_ROWS):
        stop = min(rows, start + FILE_ROWS)
        # seeded per file, so a file's rows do not depend on the total size
        texts = sample_corpus(stop - start, seed * 1_000_003 + start)
        pd.DataFrame({"id": range(start, stop), "text": texts}).to_parquet(
            os.path.join(folder, f"part-{start // FILE_ROWS:05d}.parquet"), index=False)
    return folder


class WorkerPeaks:
    """Peak RSS of each worker process (by pid), sampled every 0.1 s."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.peak = {p: 0 for p in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in self.procs:
                with contextlib.suppress(Exception):  # a worker that went away
                    self.peak[proc.pid] = max(self.peak[proc.pid], proc.memory_info().rss)
            self._stop.wait(0.1)

    def __enter__(self) -> WorkerPeaks:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="20000,200000", help="comma list of sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.rows.split(",") if x.strip()]

    import bitinglip
    from bitinglip.platform.jobs.sample import sample_corpus

    results = []
    with tempfile.TemporaryDirectory() as tmp, \
            bitinglip.connect(dashboard_address=":0", preload=[("embed", "all-MiniLM-L6-v2")]) as platform:
        pids = list(platform.client.run(os.getpid).values())
        print(f"# {cores()} cores, {len(pids)} workers; sizes {sizes}", flush=True)
        platform.submit("embed", reuse=False, model="all-MiniLM-L6-v2", inputs=sample_corpus(256, 99), partition_rows=64).result()
        for rows in sizes:
            source = write_input(rows, args.seed, os.path.join(tmp, f"in-{rows}"))
            out = os.path.join(tmp, f"out-{rows}")
            with WorkerPeaks(pids) as peaks:
                started = time.perf_counter()
                job = platform.submit("embed", reuse=False, model="all-MiniLM-L6-v2", inputs=source, output=out)
                job.wait()
                seconds = time.perf_counter() - started
            with open(os.path.join(out, "_manifest.json")) as fh:
                written = json.load(fh)
            row = {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
                   "partitions": len(written.get("partitions", [])),
                   "peak_worker_rss_gib": round(max(peaks.peak.values()) / 2**30, 3),
                   "rows_written": sum(int(p.get("rows", 0)) for p in written.get("partitions", []))}
            results.append(row)
            print(f"  {rows} rows: {row['rows_per_s']} rows/s, peak worker {gib(max(peaks.peak.values()))}",
                  flush=True)

    print()
    print("| rows | partitions | seconds | rows/s | peak worker RSS |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['partitions']} | {r['seconds']} | {r['rows_per_s']} | {r['peak_worker_rss_gib']} GiB |")
    if len(results) > 1:
        growth = results[-1]["peak_worker_rss_gib"] / results[0]["peak_worker_rss_gib"] - 1
        print(f"\npeak worker memory, {results[-1]['rows']} vs {results[0]['rows']} rows: {growth:+.1%} "
              f"(target: within 10%)")
    print(json.dumps({"cores": cores(), "results": results}), flush=True)
    return results


if __name__ == "__main__":
    main()
