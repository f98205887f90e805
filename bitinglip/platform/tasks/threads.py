"""A CPU worker's torch intra-op threads, timed where there is a choice.

A worker starts with its share of the machine's logical CPUs
(``OMP_NUM_THREADS`` from its launcher, else the cores over its task
threads).  Where that share is one thread, as in ``connect()``'s and
``bitinglip worker``'s default layout of one process per core, there is
nothing to choose.  Where it is more (a worker given several cores), the
share is not always the fastest: two threads on the hyperthreads of one
core share its matrix units, and a small model's products may not split
well.  So when the worker's first embed or classify model loads, it times
one layer of that model on a micro-batch of the default token budget at
its share, at the share counted in physical cores, and at half the share,
and keeps the fastest; a near tie keeps the share.

The verdict is per worker process (torch's thread count is), cached on
disk like the other calibrations.  An explicit thread count (the plugin's
``torch_threads``, ``BITINGLIP_TORCH_THREADS``) wins untimed.

Timed while the other workers of the machine wait on the calibration
lock, so on an otherwise idle machine: a layout's cost that shows only
when every worker runs at once is not seen (see README, "Dask is the
engine", for the layouts measured against each other).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bitinglip.platform.tasks.batching import CPU_TOKEN_BUDGET, one_layer, timing_ids
from bitinglip.platform.tasks.calibration import Choice, Timer, cache_key, cpu_name, fastest

log = logging.getLogger(__name__)
#: timed runs per thread count after the warm-up (three counts at most, a tenth of a second each for one
#: layer of all-MiniLM-L6-v2 on 2 threads)
THREAD_REPEATS = 2
#: a micro-batch faster than this at the share is a tiny model's: its timings are noise, the share is kept
THREAD_MIN_TIMED_S = 0.02


def thread_candidates(share: int, logical: int | None, physical: int | None) -> tuple[int, ...]:
    """The thread counts to time for a worker whose share is ``share`` logical CPUs of a machine with
    ``logical`` of them on ``physical`` cores: the share first (kept on a near tie), the share in physical
    cores where cores run two or more hardware threads, and half the share."""
    counts = [share]
    if logical and physical and logical > physical:
        counts.append(max(1, share * physical // logical))
    counts.append(max(1, share // 2))
    return tuple(dict.fromkeys(counts))


def physical_cores() -> tuple[int | None, int | None]:
    """The machine's logical CPUs and physical cores (None where the system does not say)."""
    import psutil

    return psutil.cpu_count(logical=True), psutil.cpu_count(logical=False)


def calibrate_threads(task: Any, loaded: Any, options: Mapping[str, Any], share: int, requested: int,
                      cache_dir: str | None, model_id: str, timer: Timer = time.perf_counter,
                      cores: tuple[int | None, int | None] | None = None) -> Choice:
    """The intra-op thread count for this worker, with the timings behind it (see the module's text).
    Leaves torch set to the count chosen."""
    import torch

    if requested:
        torch.set_num_threads(requested)
        return Choice(str(requested), "requested")
    if not str(loaded.device).startswith("cpu"):
        return Choice(str(share), "only candidate", reason="a GPU worker's threads are not timed")
    candidates = thread_candidates(share, *(cores or physical_cores()))
    if len(candidates) == 1:
        return Choice(str(share), "only candidate", reason=f"the worker's share is {share} thread(s)")
    ids = timing_ids(loaded, CPU_TOKEN_BUDGET)
    from bitinglip.platform.tasks.base import Batch

    def run(candidate: str) -> None:
        torch.set_num_threads(int(candidate))
        task.predict(loaded, Batch([""] * len(ids), ids), options)

    names = tuple(map(str, candidates))
    torch.set_num_threads(share)  # the cache key names the share
    shape = f"{task.name}:{loaded.info.get('matmul_precision', '-')}:{type(loaded.model).__name__}:one layer"
    cache = Path(cache_dir) / f"threads-{cache_key('torch_threads', model_id, names, shape)}.json" if cache_dir \
        else None
    with one_layer(loaded):
        try:
            choice = fastest(run, names, str(share), None, cache=cache, timer=timer, repeats=THREAD_REPEATS,
                             floor_s=THREAD_MIN_TIMED_S)
        except Exception as exc:  # noqa: BLE001 - a choice of speed must not fail the load: the share runs
            log.warning("timing thread counts for %s failed, keeping %d: %s", model_id, share, exc)
            choice = Choice(str(share), "default", reason=f"timing failed: {type(exc).__name__}: {exc}")
        finally:
            torch.set_num_threads(share)
    torch.set_num_threads(int(choice.value))
    log.info("torch threads for %s on %s: %s of a share of %d (%s; %s)", model_id, cpu_name(), choice.value, share,
             choice.source, choice.reason)
    return choice


def threads_record(choice: Choice) -> dict[str, Any]:
    """The runtime entries of a thread choice: the count (an int, so results reuse does not key on it: it
    changes no result) and the choice with its timings."""
    return {"torch_threads": int(choice.value), "torch_threads_choice": choice.as_dict()}
