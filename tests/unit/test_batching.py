import random
from pathlib import Path
from typing import Any

import pytest
from helpers import Clock, timed_task

from bitinglip.platform.tasks.base import Loaded
from bitinglip.platform.tasks.batching import (
    CPU_BUDGET_CANDIDATES,
    CPU_TOKEN_BUDGET,
    budget_of,
    budget_record,
    calibrate_budget,
    padding_ratio,
    plan_batches,
)
from bitinglip.platform.tasks.calibration import Choice


def test_every_row_in_exactly_one_batch_and_budget_kept() -> None:
    rng = random.Random(1)
    costs = [rng.randint(1, 300) for _ in range(2000)]
    batches = plan_batches(costs, budget=4096, max_rows=512)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(costs)))
    for b in batches:
        assert len(b) <= 512
        assert len(b) == 1 or len(b) * max(costs[i] for i in b) <= 4096


def test_row_longer_than_budget_gets_its_own_batch() -> None:
    batches = plan_batches([10, 5000, 10], budget=100)
    assert [1] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2]


def test_sorted_batches_pad_less_than_corpus_order() -> None:
    rng = random.Random(2)
    costs = [int(rng.lognormvariate(3, 0.8)) + 2 for _ in range(3000)]
    sorted_batches = plan_batches(costs, budget=4096)
    naive = [list(range(i, min(i + 64, len(costs)))) for i in range(0, len(costs), 64)]
    assert padding_ratio(costs, sorted_batches) < 1.1 < padding_ratio(costs, naive)


def test_empty_input() -> None:
    assert plan_batches([], budget=10) == []


# --- the token budget "auto" times on the worker -----------------------------

def _budget(per_token: dict[int, float], **kwargs: Any) -> tuple[Choice, Clock]:
    def cost(batch: Any) -> float:  # per_token[budget] seconds a token, at the budget nearest the batch's tokens
        tokens = sum(map(len, batch.ids))
        return tokens * per_token[min(CPU_BUDGET_CANDIDATES, key=lambda b: abs(b - tokens))]

    clock = Clock(cost)
    kwargs = {"requested": 0, "cache_dir": None, **kwargs}
    return calibrate_budget(timed_task(clock), Loaded(None), {}, kwargs["requested"], kwargs["cache_dir"], "m",
                            timer=clock), clock


FLAT = {1024: 1e-4, 2048: 1e-4, 4096: 1e-4, 8192: 1e-4}


def test_the_budget_with_the_most_tokens_per_second_is_picked() -> None:
    choice, _ = _budget({**FLAT, 2048: 0.7e-4})
    assert (choice.value, choice.source) == ("2048", "measured")
    # each budget's seconds for one micro-batch (more tokens, more seconds: compared per token)
    assert choice.seconds["8192"] == pytest.approx(8192 * 1e-4) and choice.seconds["2048"] == pytest.approx(0.14336)
    assert budget_record(choice)["token_budget"] == 2048
    assert "2048 143.4 ms (14286/s)" in choice.reason


def test_a_near_tie_keeps_the_default_budget() -> None:
    choice, _ = _budget({**FLAT, 8192: 0.97e-4})  # 3% more tokens/s: under the margin
    assert choice.value == str(CPU_TOKEN_BUDGET) and choice.source == "measured"


def test_a_cached_budget_is_reused_and_not_timed_again(tmp_path: Path) -> None:
    first, clock = _budget({**FLAT, 1024: 0.5e-4}, cache_dir=str(tmp_path))
    assert first.value == "1024" and clock.runs > 0 and len(list(tmp_path.glob("budget-*.json"))) == 1
    again, clock = _budget(FLAT, cache_dir=str(tmp_path))
    assert (again.value, again.source, clock.runs) == ("1024", "cached", 0)


def test_an_explicit_budget_wins_untimed() -> None:
    choice, clock = _budget({**FLAT, 1024: 0.5e-4}, requested=3000)
    assert (choice.value, choice.source, clock.runs) == ("3000", "requested", 0)
    # a job's token_budget (or BITINGLIP_TOKEN_BUDGET) over what the worker chose at load
    loaded = Loaded(None, info={"token_budget": 1024, "runtime": budget_record(choice)})
    budget, record = budget_of(loaded, 512)
    assert budget == 512 and record["token_budget"] == 512 and record["token_budget_choice"]["source"] == "requested"
    assert budget_of(loaded, 0)[0] == 1024
    assert budget_of(Loaded(None), 0) == (CPU_TOKEN_BUDGET, budget_record(Choice(str(CPU_TOKEN_BUDGET), "default")))


def test_a_tiny_models_budget_is_not_timed_by_noise() -> None:
    choice, _ = _budget({b: 1e-7 for b in CPU_BUDGET_CANDIDATES} | {1024: 0.5e-7})
    assert choice.value == str(CPU_TOKEN_BUDGET) and "too small" in choice.reason


def test_a_real_load_times_one_layer_and_gives_every_layer_back(tiny_encoder: Path, tmp_path: Path) -> None:
    from bitinglip.platform.plugins import ModelPlugin
    from bitinglip.platform.tasks.builtin import Embed
    from bitinglip.settings import Settings

    plugin = ModelPlugin(settings=Settings(model_cache_dir=tmp_path))
    loaded = plugin.get(Embed(), str(tiny_encoder), Embed().check_options({}))
    runtime = loaded.info["runtime"]
    # a model this small keeps the default untimed, unless a loaded machine slows its micro-batch past the floor
    assert runtime["token_budget"] == loaded.info["token_budget"] in CPU_BUDGET_CANDIDATES
    assert runtime["token_budget_choice"]["source"] == "measured" and set(runtime["token_budget_choice"]["seconds"])
    assert len(loaded.model.encoder.layer) == 2 and len(loaded.info["packed"].layers) == 2
    explicit = ModelPlugin(settings=Settings(model_cache_dir=tmp_path, token_budget=777))
    runtime = explicit.get(Embed(), str(tiny_encoder), Embed().check_options({})).info["runtime"]
    assert runtime["token_budget"] == 777 and runtime["token_budget_choice"]["source"] == "requested"
