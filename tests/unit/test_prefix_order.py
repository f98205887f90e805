"""Prefix-aware ordering of generation rows (issue 24, item 1): a partition's
rows reach the engine grouped by their rendered prompt, and every row gets
its own result back in its own place."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from bitinglip.errors import InputError
from bitinglip.platform.tasks.base import Loaded
from bitinglip.platform.tasks.engines.base import Engine, GenRequest, GenResult, TickFn
from bitinglip.platform.tasks.generate_task import Generate
from bitinglip.platform.tasks.generation import GenRow, prefix_order, render
from tests.tiny_models import make_tiny_llama


def test_prefix_order_puts_shared_prefixes_together_and_is_stable() -> None:
    prompts = [[5, 1, 9], [7, 2], [5, 1, 3], [7, 2, 8], [5, 2], [7, 2], [5, 1, 9]]
    order = prefix_order(prompts)
    assert sorted(order) == list(range(len(prompts)))  # a permutation: no row lost or doubled
    ordered = [prompts[i] for i in order]
    assert [p[0] for p in ordered] == [5, 5, 5, 5, 7, 7, 7]
    assert [p[:2] for p in ordered[:3]] == [[5, 1]] * 3  # the longer shared prefix [5, 1] stays together
    assert order.index(0) < order.index(6) and order.index(1) < order.index(5)  # equal prompts keep their order
    assert prefix_order([]) == []


class _Recording(Engine):
    """An engine of our own interface that answers each request with its prompt's ids, and keeps the order
    requests reached it."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def run(self, requests: list[GenRequest], tick: TickFn) -> list[GenResult | Exception]:
        self.seen = [list(r.prompt_ids) for r in requests]
        self.grouped = [r.grouped for r in requests]
        tick(len(requests))
        return [GenResult([" ".join(map(str, r.prompt_ids))], ["length"], len(r.prompt_ids), 1) for r in requests]

    def nbytes(self) -> int:
        return 0

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from transformers import AutoTokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")
    return path, AutoTokenizer.from_pretrained(path)


def _chats(systems: int, per: int, seed: int) -> list[GenRow]:
    rows = [GenRow(None, (("system", f"system prompt {s}: answer in the manner of author {s} " * 3),
                          ("user", f"question {q} about {s}?")))
            for s in range(systems) for q in range(per)]
    random.Random(seed).shuffle(rows)
    return rows


@pytest.mark.parametrize("on", [True, False])
def test_run_rows_hands_rows_over_grouped_and_puts_results_back(llama: tuple[Path, Any], on: bool) -> None:
    path, tokenizer = llama
    engine = _Recording()
    loaded = Loaded(None, tokenizer, "cpu", 512, {"engine": engine, "path": str(path)})
    task = Generate()
    options = task.check_options({"prefix_order": on})
    rows = _chats(4, 6, seed=1) + [GenRow("a plain prompt, no chat")]
    outputs, truncated, failed, _ = task.run_rows(loaded, rows, options, lambda done: None)
    assert not failed and not any(truncated)
    rendered = [render(tokenizer, row, "tiny") for row in rows]
    # every row has its own prompt's answer, in its own place, whatever order the engine saw
    assert [o["text"] for o in outputs] == [" ".join(map(str, ids)) for ids in rendered]
    system_of = {tuple(ids): row.messages[0][1] if row.messages else None for ids, row in zip(rendered, rows)}
    seen = [system_of[tuple(ids)] for ids in engine.seen]
    runs = [s for k, s in enumerate(seen) if k == 0 or seen[k - 1] != s]  # one entry per run of a system prompt
    if on:
        assert len(runs) == 5 and engine.seen == sorted(rendered)  # each system prompt's rows arrive together
    else:
        assert engine.seen == rendered and len(runs) > 5  # the input's order, interleaved
    assert engine.grouped == [on] * len(rows)  # with the option on, they may wait in the engine's prefix sweep


def test_a_gateways_online_rows_never_wait_in_the_prefix_sweep(llama: tuple[Path, Any]) -> None:
    """runner._on_engine(online=True) marks the call: its rows go to the engine at once, not behind bulk rows
    held in a vLLM engine's prefix sweep (they are still sorted within the call)."""
    from bitinglip.platform.jobs.runner import _on_engine

    path, tokenizer = llama
    engine = _Recording()
    loaded = Loaded(None, tokenizer, "cpu", 512, {"engine": engine, "path": str(path)})
    task = Generate()
    options = task.check_options({})
    rows = _chats(2, 3, seed=2)
    _on_engine(task.run_rows, loaded, rows, options, lambda done: None, online=True)
    assert engine.grouped == [False] * len(rows) and engine.seen == sorted(engine.seen)
    task.run_rows(loaded, rows, options, lambda done: None)  # a partition's call, as before
    assert engine.grouped == [True] * len(rows)


def test_prefix_order_option_takes_true_or_false_only() -> None:
    task = Generate()
    assert task.check_options({})["prefix_order"] is True
    assert task.check_options({"prefix_order": False})["prefix_order"] is False
    with pytest.raises(InputError, match=r"option prefix_order='no': expected one of True, False"):
        task.check_options({"prefix_order": "no"})
    with pytest.raises(InputError, match=r"prefix_order=1"):
        task.check_options({"prefix_order": 1})
