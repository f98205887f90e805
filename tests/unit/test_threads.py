"""A CPU worker's torch threads, timed where its share of the cores leaves a choice."""

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Clock, timed_task

from bitinglip.platform.tasks.base import Loaded
from bitinglip.platform.tasks.calibration import Choice
from bitinglip.platform.tasks.threads import calibrate_threads, thread_candidates, threads_record


class _Threads:
    """torch's thread count, faked: a process that imported vLLM's CPU build (the full suite's) keeps torch
    at the cores it bound, whatever ``set_num_threads`` asks."""

    def __init__(self) -> None:
        self.count = 2

    def set(self, n: int) -> None:
        self.count = n

    def get(self) -> int:
        return self.count


@pytest.fixture(autouse=True)
def threads(monkeypatch: pytest.MonkeyPatch) -> _Threads:
    fake = _Threads()
    monkeypatch.setattr(torch, "set_num_threads", fake.set)
    monkeypatch.setattr(torch, "get_num_threads", fake.get)
    return fake


def test_the_share_comes_first_then_physical_cores_then_half() -> None:
    assert thread_candidates(1, 2, 2) == (1,)  # one core's share: nothing to choose
    assert thread_candidates(2, 2, 2) == (2, 1)
    assert thread_candidates(8, 16, 8) == (8, 4)  # two hardware threads a core: the physical share is the half
    assert thread_candidates(12, 48, 12) == (12, 3, 6)
    assert thread_candidates(4, None, None) == (4, 2)  # a system that does not count its cores


def _threads(seconds: dict[int, float], share: int = 8, cores: tuple[int, int] = (16, 8),
             **kwargs: Any) -> tuple[Choice, Clock]:
    clock = Clock(lambda batch: seconds[torch.get_num_threads()])  # a micro-batch's seconds at torch's count
    kwargs = {"requested": 0, "cache_dir": None, "loaded": Loaded(None), **kwargs}
    return calibrate_threads(timed_task(clock), kwargs["loaded"], {}, share, kwargs["requested"], kwargs["cache_dir"],
                             "m", timer=clock, cores=cores), clock


def test_hyperthreads_that_slow_the_products_leave_the_physical_share() -> None:
    choice, clock = _threads({8: 0.30, 4: 0.20})
    assert (choice.value, choice.source) == ("4", "measured") and clock.runs > 2
    assert torch.get_num_threads() == 4  # the worker runs on with the count chosen
    assert choice.seconds == {"8": pytest.approx(0.30), "4": pytest.approx(0.20)}
    assert threads_record(choice)["torch_threads"] == 4 and "4 200.0 ms" in choice.reason


def test_the_share_wins_where_more_threads_are_faster() -> None:
    choice, _ = _threads({8: 0.10, 4: 0.20})
    assert (choice.value, choice.source) == ("8", "measured") and torch.get_num_threads() == 8


def test_a_near_tie_keeps_the_share() -> None:
    choice, _ = _threads({8: 0.100, 4: 0.098})  # 2% faster with fewer: under the margin
    assert choice.value == "8"


def test_a_cached_count_is_reused_and_not_timed_again(tmp_path: Path) -> None:
    first, clock = _threads({8: 0.30, 4: 0.20}, cache_dir=str(tmp_path))
    assert first.value == "4" and clock.runs > 0 and len(list(tmp_path.glob("threads-*.json"))) == 1
    again, clock = _threads({8: 0.10, 4: 0.20}, cache_dir=str(tmp_path))
    assert (again.value, again.source, clock.runs) == ("4", "cached", 0) and torch.get_num_threads() == 4


def test_an_explicit_count_wins_untimed() -> None:
    choice, clock = _threads({8: 0.30, 4: 0.20}, requested=6)
    assert (choice.value, choice.source, clock.runs) == ("6", "requested", 0)


def test_one_core_and_a_gpu_are_not_timed() -> None:
    choice, clock = _threads({1: 0.1}, share=1, cores=(2, 2))
    assert (choice.value, choice.source, clock.runs) == ("1", "only candidate", 0)
    choice, clock = _threads({8: 0.30, 4: 0.20}, loaded=Loaded(None, device="cuda:0"))
    assert (choice.value, choice.source, clock.runs) == ("8", "only candidate", 0)


def test_a_failed_timing_keeps_the_share() -> None:
    choice, _ = _threads({8: 0.30})  # no figure for 4 threads: the run raises
    assert (choice.value, choice.source) == ("8", "default") and "KeyError" in choice.reason
    assert torch.get_num_threads() == 8


def test_a_real_load_names_the_workers_threads(tiny_encoder: Path, tmp_path: Path) -> None:
    from bitinglip.platform.plugins import ModelPlugin
    from bitinglip.platform.tasks.builtin import Embed
    from bitinglip.settings import Settings

    plugin = ModelPlugin(settings=Settings(model_cache_dir=tmp_path))
    runtime = plugin.get(Embed(), str(tiny_encoder), Embed().check_options({})).info["runtime"]
    assert runtime["torch_threads"] == torch.get_num_threads() >= 1
    assert runtime["torch_threads_choice"]["source"] in ("measured", "only candidate")
    # the worker's count is timed once: a second model reads the same verdict
    assert plugin.threads is not None and plugin.threads.value == str(runtime["torch_threads"])
    explicit = ModelPlugin(settings=Settings(model_cache_dir=tmp_path, torch_threads=1))
    runtime = explicit.get(Embed(), str(tiny_encoder), Embed().check_options({})).info["runtime"]
    assert runtime["torch_threads"] == 1 and runtime["torch_threads_choice"]["source"] == "requested"
