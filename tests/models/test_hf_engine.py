"""HFEngine on a real tiny Llama: transformers' continuous batching, no mocks.

The anchor is ``model.generate``: greedy rows must give its tokens, one for
one.  One engine serves the module, as one engine serves a worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers.generation.continuous_batching", reason="needs transformers with continuous batching")

import torch
from tiny_models import make_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitinglip.errors import EngineError, InputError, UnsupportedOptionError
from bitinglip.platform.tasks.engines.base import GenRequest, GenResult
from bitinglip.platform.tasks.engines.hf_engine import HFEngine

PROMPTS = ["The cat sat on the mat.", "Batch inference on Dask.", "Hello",
           "A much longer prompt about the weather, the trains, and the price of bread in the market on a Tuesday.",
           "x", "Summaries of tickets"]
MAX_TOKENS = [12, 1, 30, 7, 24, 18]


def no_tick(done: int) -> None:
    pass


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", initializer_range=0.1)


@pytest.fixture(scope="module")
def tokenizer(llama: Path) -> Any:
    return AutoTokenizer.from_pretrained(llama)


@pytest.fixture(scope="module")
def engine(llama: Path) -> Iterator[HFEngine]:
    eng = HFEngine.load(llama, dtype=torch.float32, kv_cache_bytes=16 * 2**20)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(llama: Path, tokenizer: Any) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy tokens and their log-probabilities from ``model.generate``, one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    out = []
    for prompt, max_tokens in zip(PROMPTS, MAX_TOKENS):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        tokens = gen.sequences[0, ids.shape[1]:].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(gen.logits, tokens)]
        out.append((tokens, logprobs))
    return out


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def greedy(tokenizer: Any, **params: Any) -> list[GenRequest]:
    return [GenRequest(ids(tokenizer, p), {"max_tokens": m, "temperature": 0.0, **params})
            for p, m in zip(PROMPTS, MAX_TOKENS)]


def texts(results: list[GenResult | Exception]) -> list[list[str]]:
    assert all(isinstance(r, GenResult) for r in results), results
    return [r.texts for r in results]  # type: ignore[union-attr]


def test_greedy_rows_give_model_generate_tokens_one_for_one(engine: HFEngine, tokenizer: Any,
                                                           reference: list[tuple[list[int], list[float]]]) -> None:
    results = engine.run(greedy(tokenizer, logprobs=0), no_tick)
    for result, (tokens, logprobs), max_tokens in zip(results, reference, MAX_TOKENS):
        assert isinstance(result, GenResult), result
        assert [t["token"] for t in result.logprobs[0]] == [tokenizer.decode([t]) for t in tokens]
        assert [t["logprob"] for t in result.logprobs[0]] == pytest.approx(logprobs, abs=1e-3)
        assert result.texts == [tokenizer.decode(tokens, skip_special_tokens=True)]
        assert result.completion_tokens == len(tokens) <= max_tokens
        ended_on_eos = tokens[-1] == tokenizer.eos_token_id
        assert result.finish_reasons == ["stop" if ended_on_eos else "length"]
        assert result.prompt_tokens == len(ids(tokenizer, PROMPTS[results.index(result)]))


def test_ignore_eos_runs_every_row_to_max_tokens(engine: HFEngine, tokenizer: Any) -> None:
    results = engine.run(greedy(tokenizer, ignore_eos=True), no_tick)
    assert [r.completion_tokens for r in results] == MAX_TOKENS  # type: ignore[union-attr]
    assert all(r.finish_reasons == ["length"] for r in results)  # type: ignore[union-attr]


def test_a_stop_string_ends_the_request_and_is_cut(engine: HFEngine, tokenizer: Any) -> None:
    prompt = ids(tokenizer, PROMPTS[0])
    full = engine.run([GenRequest(prompt, {"max_tokens": 40, "ignore_eos": True})], no_tick)[0]
    text = full.texts[0]  # type: ignore[union-attr]
    # a piece of the text's middle, cut where it first appears
    stop = next(text[i:i + 3] for i in range(8, len(text) - 3) if text.find(text[i:i + 3]) == i and
                text[i:i + 3].strip())
    cut = engine.run([GenRequest(prompt, {"max_tokens": 450, "ignore_eos": True, "stop": ("zzzz", stop)})],
                     no_tick)[0]
    assert isinstance(cut, GenResult), cut
    assert cut.texts == [text[:text.find(stop)]]
    assert cut.finish_reasons == ["stop"]
    assert cut.completion_tokens < 40
    # the request was cancelled in the manager, not left to run its 450 tokens: the cancel goes in before the next
    # call's request, so once that one is done nothing else is running
    engine.run([GenRequest(prompt, {"max_tokens": 2})], no_tick)
    assert engine.stats()["running"] == 0


def test_a_streamed_request_hands_its_text_on_as_it_grows(engine: HFEngine, tokenizer: Any) -> None:
    prompt = ids(tokenizer, PROMPTS[0])
    ask = {"max_tokens": 30, "ignore_eos": True}
    plain = engine.run([GenRequest(prompt, ask)], no_tick)[0]
    pieces: list[tuple[int, str]] = []
    streamed = engine.run([GenRequest(prompt, ask, on_text=lambda i, text: pieces.append((i, text)))], no_tick)[0]
    assert isinstance(plain, GenResult) and isinstance(streamed, GenResult), (plain, streamed)
    assert streamed.texts == plain.texts  # the answer is the whole answer, streamed or not
    sent = "".join(text for _, text in pieces)
    whole = plain.texts[0]
    # many pieces, each following the last (what is held back while it may change comes with the result)
    assert len(pieces) >= 10 and {i for i, _ in pieces} == {0} and whole.startswith(sent) and len(sent) > len(whole) // 2
    # a stop string: no piece carries any of it, nor what follows it
    stop = next(whole[i:i + 3] for i in range(8, len(whole) - 3) if whole.find(whole[i:i + 3]) == i and
                whole[i:i + 3].strip())
    pieces.clear()
    cut = engine.run([GenRequest(prompt, {**ask, "stop": (stop,)}, on_text=lambda i, text: pieces.append((i, text)))],
                     no_tick)[0]
    assert isinstance(cut, GenResult) and cut.texts == [whole[:whole.find(stop)]]
    assert cut.texts[0].startswith("".join(text for _, text in pieces))


def test_same_seed_same_text_whatever_runs_beside_it(engine: HFEngine, tokenizer: Any) -> None:
    row = GenRequest(ids(tokenizer, PROMPTS[0]), {"max_tokens": 20, "temperature": 0.9, "seed": 7, "n": 2,
                                                  "ignore_eos": True})
    alone = texts(engine.run([row], no_tick))[0]
    crowded = texts(engine.run(greedy(tokenizer) + [row], no_tick))[-1]
    other_seed = texts(engine.run([GenRequest(row.prompt_ids, {**row.params, "seed": 8})], no_tick))[0]
    assert alone == crowded
    assert alone[0] != alone[1]  # completions of one row draw their own noise
    assert other_seed != alone


def test_sampling_filters_that_keep_one_token_give_the_greedy_text(engine: HFEngine, tokenizer: Any) -> None:
    plain = texts(engine.run(greedy(tokenizer), no_tick))
    for narrow in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        sampled = texts(engine.run(greedy(tokenizer, temperature=1.5, seed=3, **narrow), no_tick))
        assert sampled == plain, narrow


def test_rows_the_engine_cannot_honour_are_refused_in_their_place(engine: HFEngine, tokenizer: Any) -> None:
    prompt = ids(tokenizer, PROMPTS[0])
    refused = [{"response_format": {"type": "json_object"}}, {"repetition_penalty": 1.3},
               {"presence_penalty": 0.5}, {"logprobs": 3}, {"logprobs": 0, "temperature": 0.7, "seed": 1}]
    requests = [GenRequest(prompt, {"max_tokens": 4, **p}) for p in refused]
    requests += [GenRequest(prompt, {"max_tokens": 4, "response_format": {"type": "text"}}), GenRequest(list(range(3, 500)), {"max_tokens": 20}),
                 GenRequest([], {"max_tokens": 4})]
    results = engine.run(requests, no_tick)
    for result in results[:len(refused)]:
        assert isinstance(result, UnsupportedOptionError), result
    assert "vLLM" in str(results[0]) and "response_format" in str(results[0])
    assert isinstance(results[len(refused)], GenResult)
    assert isinstance(results[-2], InputError) and "positions" in str(results[-2])
    assert isinstance(results[-1], InputError)


def test_concurrent_calls_from_two_threads_each_get_their_own_rows(engine: HFEngine, tokenizer: Any) -> None:
    expected = texts(engine.run(greedy(tokenizer), no_tick))
    got: dict[int, list[list[str]]] = {}

    def call(k: int) -> None:
        got[k] = texts(engine.run(greedy(tokenizer)[k::2], no_tick))

    threads = [threading.Thread(target=call, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got[0] == expected[0::2] and got[1] == expected[1::2]


class Stop(Exception):
    pass


def test_a_raising_tick_aborts_only_its_own_call(engine: HFEngine, tokenizer: Any) -> None:
    expected = texts(engine.run(greedy(tokenizer), no_tick))
    long_rows = [GenRequest(ids(tokenizer, p), {"max_tokens": 400, "ignore_eos": True}) for p in PROMPTS[:3]]
    started = threading.Event()
    outcome: dict[str, Any] = {}

    def cancelled_call() -> None:
        def tick(done: int) -> None:
            if started.is_set() and outcome.get("other_running"):
                raise Stop
        try:
            engine.run(long_rows, tick)
        except Stop:
            outcome["raised"] = True

    def other_call() -> None:
        outcome["other_running"] = True
        outcome["other"] = texts(engine.run(greedy(tokenizer), no_tick))

    canceller = threading.Thread(target=cancelled_call)
    canceller.start()
    started.set()
    other = threading.Thread(target=other_call)
    other.start()
    canceller.join(120)
    other.join(120)
    assert outcome.get("raised") and outcome["other"] == expected
    # the aborted requests left the manager: nothing runs or waits once the other call is done
    deadline = time.monotonic() + 30
    while engine.stats().get("running") or engine.stats().get("waiting"):
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.1)
    assert engine.stats()["kv_cache_usage"] == 0.0


def test_nbytes_counts_weights_and_the_kv_cache(engine: HFEngine, llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights + 16 * 2**20 * 0.9 < engine.nbytes() < weights + 16 * 2**20 * 1.5


def test_shutdown_fails_running_calls_and_leaves_no_thread(llama: Path, tokenizer: Any) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    before = set(threading.enumerate())  # after loading: a progress bar's monitor thread is not the engine's
    own = HFEngine(model, tokenizer, kv_cache_bytes=8 * 2**20)
    running = threading.Event()
    result: list[Any] = []

    def tick(done: int) -> None:
        running.set()

    def call() -> None:
        result.extend(own.run([GenRequest(ids(tokenizer, PROMPTS[0]), {"max_tokens": 450, "ignore_eos": True})],
                              tick))

    caller = threading.Thread(target=call)
    caller.start()
    running.wait(60)
    own.shutdown()
    own.shutdown()
    caller.join(60)
    assert len(result) == 1 and isinstance(result[0], EngineError), result
    assert set(threading.enumerate()) - before == set()
    after = own.run([GenRequest(ids(tokenizer, "hi"), {"max_tokens": 2})], no_tick)
    assert isinstance(after[0], EngineError)
    assert own.nbytes() == 0


def test_a_cache_too_small_for_every_row_at_once_runs_fewer_at_a_time(engine: HFEngine, llama: Path,
                                                                     tokenizer: Any) -> None:
    """A KV cache of 4 pages (256 tokens) for 8 rows of about 100 tokens each: the engine runs fewer rows at
    once instead of failing, and every row gets the tokens the roomy engine gives it."""
    rows = [GenRequest(ids(tokenizer, p), {"max_tokens": 100, "ignore_eos": True, "temperature": 0.0})
            for p in (PROMPTS + PROMPTS)[:8]]
    expected = engine.run(rows, no_tick)
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    page_bytes = 2 * 2 * 2 * 64 * 4 * 64  # (k, v) x layers x kv heads x head size x float32 x page of 64 tokens
    small = HFEngine(model, tokenizer, kv_cache_bytes=4 * page_bytes)
    peak = {"running": 0.0}

    def tick(done: int) -> None:
        peak["running"] = max(peak["running"], small.stats().get("running", 0.0))

    try:
        got: list[Any] = []
        caller = threading.Thread(target=lambda: got.extend(small.run(rows, tick)))
        caller.start()
        caller.join(240)
        assert not caller.is_alive(), "the engine with a small cache never finished"
    finally:
        small.shutdown()
    assert [r.completion_tokens for r in got] == [100] * 8, got  # type: ignore[union-attr]
    assert texts(got) == texts(expected)
    assert 0 < peak["running"] < 8, peak
