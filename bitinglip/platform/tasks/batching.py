"""Micro-batches cut by a token budget over rows sorted by length.

Sorting by length keeps padding small; a budget of ``rows x longest row``
instead of a fixed row count keeps each forward pass about the same size,
so short rows go in large batches and long rows in small ones.

On a CPU the budget that runs fastest depends on the machine (its caches,
its matrix kernels, the threads per worker), so when the settings and the
job leave it open the worker times a few budgets on the loaded model
(:func:`calibrate_budget`) and keeps the one with the most tokens per second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitinglip.platform.tasks.calibration import Choice, Timer, cache_key, cpu_name, fastest

log = logging.getLogger(__name__)
#: tokens per micro-batch when nothing else decides: one CPU thread
#: is fastest around 4k (measured on 2 cores), a GPU wants far more
CPU_TOKEN_BUDGET = 4096
GPU_TOKEN_BUDGET = 32768
MAX_BATCH_ROWS = 512
#: the budgets ``auto`` times on a CPU (the default among them, kept on a near tie)
CPU_BUDGET_CANDIDATES = (1024, 2048, 4096, 8192)
#: the row length of the timed micro-batches: a sentence as corpora hold them
BUDGET_ROW_TOKENS = 32
#: a micro-batch of the default budget faster than this (through the one layer timed) is a tiny model's: its
#: timings are noise, and two workers could choose differently, so it keeps the default untimed
BUDGET_MIN_TIMED_S = 0.02
#: timed runs per budget after the warm-up: the four budgets run 15k tokens a round, so one round is what a
#: load can afford (a second on 2 cores for all-MiniLM-L6-v2's one layer)
BUDGET_REPEATS = 1


def default_budget(device: str) -> int:
    return GPU_TOKEN_BUDGET if device.startswith("cuda") else CPU_TOKEN_BUDGET


def budget_of(loaded: Any, requested: int) -> tuple[int, dict[str, Any]]:
    """The token budget for micro-batches of ``loaded`` and the runtime record that says why: ``requested``
    (the job's or the settings' value, 0 for none) wins; else what the worker chose when the model loaded
    (:func:`calibrate_budget`); else the device's default."""
    if requested:
        return requested, budget_record(Choice(str(requested), "requested"))
    info = getattr(loaded, "info", None) or {}
    chosen = info.get("token_budget")
    if chosen:
        runtime = info.get("runtime") or {}
        return int(chosen), {k: runtime[k] for k in ("token_budget", "token_budget_choice") if k in runtime}
    budget = default_budget(str(getattr(loaded, "device", "cpu")))
    return budget, budget_record(Choice(str(budget), "default"))


def budget_record(choice: Choice) -> dict[str, Any]:
    """The runtime entries of a budget choice: the budget (an int, so results reuse does not key on it: it
    changes no result) and the choice with its timings."""
    return {"token_budget": int(choice.value), "token_budget_choice": choice.as_dict()}


def calibrate_budget(task: Any, loaded: Any, options: Mapping[str, Any], requested: int, cache_dir: str | None,
                     model_id: str, timer: Timer = time.perf_counter) -> Choice:
    """The token budget for ``loaded`` on this worker: an explicit ``requested`` wins; on a CPU, each of
    :data:`CPU_BUDGET_CANDIDATES` is timed as one micro-batch of rows of :data:`BUDGET_ROW_TOKENS` tokens
    through ``task.predict`` (the code a job runs, at the precision already chosen) and the one with the most
    tokens per second is kept, the default on a near tie.

    Only the first of the model's layers runs while timing: the layers are alike, so one shows how tokens per
    second change with the budget, at a sixth of all-MiniLM-L6-v2's cost (the whole model on all four budgets
    took 3 to 6 s on 2 cores)."""
    if requested:
        return Choice(str(requested), "requested")
    default = default_budget(str(loaded.device))
    if not str(loaded.device).startswith("cpu"):
        return Choice(str(default), "only candidate", reason="a GPU's budget is not timed")
    batches = {str(budget): timing_ids(loaded, budget) for budget in CPU_BUDGET_CANDIDATES}
    work = {c: float(len(ids) * BUDGET_ROW_TOKENS) for c, ids in batches.items()}
    from bitinglip.platform.tasks.base import Batch

    def run(candidate: str) -> None:
        ids = batches[candidate]
        task.predict(loaded, Batch([""] * len(ids), ids), options)

    shape = (f"{task.name}:{loaded.info.get('matmul_precision', '-')}:{type(loaded.model).__name__}:"
             f"{BUDGET_ROW_TOKENS}:one layer")
    candidates = tuple(map(str, CPU_BUDGET_CANDIDATES))
    cache = None
    if cache_dir:
        cache = Path(cache_dir) / f"budget-{cache_key('token_budget', model_id, candidates, shape)}.json"
    with one_layer(loaded) as layers:
        try:
            choice = fastest(run, candidates, str(default), None, cache=cache, timer=timer,
                             repeats=BUDGET_REPEATS, floor_s=BUDGET_MIN_TIMED_S, work=work)
        except Exception as exc:  # noqa: BLE001 - a choice of speed must not fail the load: the default runs
            log.warning("timing token budgets for %s failed, keeping %d: %s", model_id, default, exc)
            return Choice(str(default), "default", reason=f"timing failed: {type(exc).__name__}: {exc}")
    if choice.source == "measured" and layers:
        choice = Choice(choice.value, choice.source, choice.seconds, choice.min_cosine,
                        f"{choice.reason} (tokens/s of 1 of the model's {layers} layers)")
    log.info("token budget for %s on %s: %s (%s; %s)", model_id, cpu_name(), choice.value, choice.source,
             choice.reason)
    return choice


def timing_ids(loaded: Any, budget: int) -> list[list[int]]:
    """A micro-batch of ``budget`` tokens for timing ``loaded``: rows of :data:`BUDGET_ROW_TOKENS` seeded
    random token ids from the model's vocabulary (past its first thousand, where special tokens sit)."""
    import numpy as np

    vocab = int(getattr(getattr(loaded.model, "config", None), "vocab_size", 30522) or 30522)
    rows = budget // BUDGET_ROW_TOKENS
    return np.random.default_rng(0).integers(min(1000, vocab // 2), vocab, size=(rows, BUDGET_ROW_TOKENS)).tolist()


@contextmanager
def one_layer(loaded: Any) -> Iterator[int]:
    """``loaded`` running only the first of its layers, for the ``with`` block; yields how many it has (0:
    no stack of layers found, the whole model runs).  Called while the model loads, before any task can
    reach it."""
    import torch

    packed = loaded.info.get("packed")
    kept: list[tuple[Any, str, Any]] = []
    if packed is not None:  # the embed task's own forward pass: its layer lists
        for name in ("exact", "fast"):
            kernel = getattr(packed, name)
            if kernel is not None:
                kept.append((packed, name, kernel))
                setattr(packed, name, (kernel[0], kernel[1][:1]))
    stack = None  # the longest ModuleList of one module type: the transformer's layers
    model = loaded.model
    if isinstance(model, torch.nn.Module):
        for parent in model.modules():
            for name, child in parent.named_children():
                if (isinstance(child, torch.nn.ModuleList) and len(child) > 1
                        and len({type(m) for m in child}) == 1 and (stack is None or len(child) > len(stack[2]))):
                    stack = (parent, name, child)
    if stack is not None:
        kept.append(stack)
        setattr(stack[0], stack[1], torch.nn.ModuleList(list(stack[2])[:1]))
    try:
        yield len(stack[2]) if stack is not None else 0
    finally:
        for owner, name, value in reversed(kept):
            setattr(owner, name, value)


def plan_batches(costs: Sequence[int], budget: int, max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Row indices grouped into micro-batches, shortest rows first.

    Every row lands in exactly one batch; a row longer than the budget gets
    a batch of its own rather than being dropped.
    """
    order = sorted(range(len(costs)), key=costs.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max(1, costs[i])  # sorted, so the newest row is the widest
        if current and ((len(current) + 1) * width > budget or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_ratio(costs: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Padded tokens over real tokens (1.0 means no padding at all)."""
    real = sum(costs)
    padded = sum(len(b) * max(costs[i] for i in b) for b in batches if b)
    return padded / real if real else 1.0
