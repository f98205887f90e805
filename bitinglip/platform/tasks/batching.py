"""Micro-batches cut by a token budget over rows sorted by length.

Sorting by length keeps padding small; a budget of ``rows x longest row``
instead of a fixed row count keeps each forward pass about the same size,
so short rows go in large batches and long rows in small ones.
"""

from __future__ import annotations

from collections.abc import Sequence

#: tokens per micro-batch when the settings leave it to us: one CPU thread
#: is fastest around 4k (measured on 2 cores), a GPU wants far more
CPU_TOKEN_BUDGET = 4096
GPU_TOKEN_BUDGET = 32768
MAX_BATCH_ROWS = 512


def default_budget(device: str) -> int:
    return GPU_TOKEN_BUDGET if device.startswith("cuda") else CPU_TOKEN_BUDGET


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
