"""Option bounds (issue 14.1, 14.8) and the row rule for lone surrogates (14.7),
without a cluster: every option of every task, out of range, huge, negative,
NaN, infinite or of the wrong type, is an InputError naming it; what passes
is a plain value that msgpack (the scheduler's wire format) can encode."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitinglip.errors import InputError
from bitinglip.platform.jobs.client import _check_arguments
from bitinglip.platform.tasks.builtin import BUILTIN_TASKS, Classify, Generate, texts_or_error
from bitinglip.platform.tasks.options import INT64_MAX

#: values no option of any built-in task takes
HOSTILE = st.one_of(
    st.integers(min_value=2**63), st.integers(max_value=-1), st.just(2**64), st.just(-(2**70)),
    st.sampled_from([math.nan, math.inf, -math.inf]), st.floats(min_value=1e6, allow_infinity=True),
    st.floats(max_value=-1e-9, allow_infinity=True),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.binary(max_size=4),
    st.text(max_size=8).filter(lambda s: s not in {"float32", "float16", "bfloat16", "int8", "mean", "cls", "max",
                                                   "lasttoken", "auto", "highest", "high", "medium"}),
)
OPTIONS = [(task, name) for task, t in sorted(BUILTIN_TASKS.items()) for name in sorted(t.defaults)]


def _refused(task: str, name: str, value: Any) -> bool:
    try:
        merged = BUILTIN_TASKS[task].check_options({name: value})
    except InputError as exc:
        assert name in str(exc)
        return True
    msgpack.packb(merged)  # what passes must travel to the scheduler
    return False


@pytest.mark.parametrize("option", OPTIONS, ids="-".join)
@settings(max_examples=40, deadline=None)
@given(value=HOSTILE)
def test_hostile_option_values_are_refused_with_their_name(option: tuple[str, str], value: Any) -> None:
    task, name = option
    # a short non-empty text is a stop string; a number from -2 to 2 is a presence or frequency
    # penalty (OpenAI's range); nothing else here is any option's value
    fits = (option == ("generate", "stop") and isinstance(value, str) and value != "") or (
        name in ("presence_penalty", "frequency_penalty") and isinstance(value, (int, float))
        and not isinstance(value, bool) and -2 <= value <= 2)
    assert _refused(task, name, value) is not fits


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(min_value=0, max_value=INT64_MAX), top_k=st.integers(min_value=0, max_value=1_000_000),
       temperature=st.floats(min_value=0, max_value=2), top_p=st.floats(min_value=1e-6, max_value=1),
       max_new_tokens=st.integers(min_value=1, max_value=4096))
def test_in_range_generate_options_pass_as_plain_values(seed: int, top_k: int, temperature: float, top_p: float,
                                                        max_new_tokens: int) -> None:
    merged = Generate().check_options({"seed": seed, "top_k": top_k, "temperature": temperature, "top_p": top_p,
                                       "max_new_tokens": max_new_tokens})
    assert msgpack.unpackb(msgpack.packb(merged))["seed"] == seed


@pytest.mark.parametrize("task,options,word", [
    ("classify", {"top_k": 2**64}, "top_k"),
    ("generate", {"top_k": 2**64}, "top_k"),
    ("generate", {"seed": 2**64}, "seed"),
    ("generate", {"seed": 2**70}, "seed"),
    ("generate", {"seed": 10**5000}, "seed"),  # too long even to print
    ("generate", {"temperature": 10**400}, "temperature"),  # past float's range
    ("generate", {"temperature": math.nan}, "temperature"),
    ("generate", {"top_p": math.inf}, "top_p"),
    ("generate", {"repetition_penalty": -math.inf}, "repetition_penalty"),
    ("generate", {"stop": 5}, "stop"),
    ("generate", {"stop": ["x"] * 17}, "stop"),
    ("generate", {"stop": ["y" * 201]}, "stop"),
    ("embed", {"normalize": 1}, "normalize"),
    ("embed", {"dtype": ["float32"]}, "dtype"),
])
def test_each_issue_value_is_refused(task: str, options: dict[str, Any], word: str) -> None:
    with pytest.raises(InputError, match=word):
        BUILTIN_TASKS[task].check_options(options)


def test_options_that_are_not_a_mapping_name_options() -> None:
    with pytest.raises(InputError, match="options must be a mapping"):
        Classify().check_options("x")  # type: ignore[arg-type]


def _config(tmp_path: Path, **config: Any) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_classify_top_k_is_bounded_by_the_model_labels(tmp_path: Path) -> None:
    model = _config(tmp_path, num_labels=3, id2label={"0": "a", "1": "b", "2": "c"})
    assert Classify().check_model_options(Classify().check_options({"top_k": 3}), model)["top_k"] == 3
    with pytest.raises(InputError, match="top_k=4"):
        Classify().check_model_options(Classify().check_options({"top_k": 4}), model)


def test_generate_bounds_come_from_vocabulary_and_positions(tmp_path: Path) -> None:
    model = _config(tmp_path, vocab_size=500, n_positions=128)
    gen = Generate()
    assert gen.check_model_options(gen.check_options({"max_new_tokens": 127, "top_k": 500}), model)
    with pytest.raises(InputError, match="max_tokens=128"):
        gen.check_model_options(gen.check_options({"max_new_tokens": 128}), model)
    with pytest.raises(InputError, match="top_k=501"):
        gen.check_model_options(gen.check_options({"top_k": 501}), model)
    # a model whose folder this process cannot see keeps the fixed bounds
    assert gen.check_model_options(gen.check_options({"max_new_tokens": 4096}), str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("name,value", [
    ("timeout", math.nan), ("timeout", math.inf), ("timeout", -math.inf), ("timeout", 0), ("timeout", 10**12),
    ("partition_rows", 2**64), ("token_budget", 2**70), ("retries", 2**64), ("retries", -1),
    ("text_column", ""), ("text_column", "a\udc80"), ("text_column", 5), ("gpu", "yes"), ("fail_fast", 1),
    ("priority", 0), ("priority", 11), ("priority", 5.0), ("priority", True), ("priority", 2**64),
])
def test_client_arguments_are_bounded(name: str, value: Any) -> None:
    arguments: dict[str, Any] = {"partition_rows": None, "token_budget": None, "retries": 0, "timeout": None,
                                 "job_id": None, "text_column": "text", "gpu": None, "fail_fast": False,
                                 "priority": None}
    _check_arguments(**arguments)
    with pytest.raises(InputError, match=name):
        _check_arguments(**{**arguments, name: value})


def test_lone_surrogate_row_is_named() -> None:
    assert texts_or_error(["a", "\U0001f600 fine"], [0, 1]) == ["a", "\U0001f600 fine"]
    with pytest.raises(InputError, match=r"row id='b': the text is not valid Unicode .* at character 4"):
        texts_or_error(["ok", "bad \ud800 x"], ["a", "b"])


def test_one_rule_for_a_whole_number_and_every_caller_keeps_its_words() -> None:
    import numpy as np

    from bitinglip.platform.tasks.options import is_whole

    assert is_whole(3) and is_whole(np.int64(3), 1, 3) and is_whole(-5) and is_whole(10**30, 1)
    assert not any(is_whole(v) for v in (True, False, 3.0, "3", None, np.float64(3)))
    assert not is_whole(0, 1) and not is_whole(11, 1, 10)
    for name, value in (("retries", True), ("partition_rows", True), ("token_budget", False)):
        arguments: dict[str, Any] = {"partition_rows": None, "token_budget": None, "retries": 0, "timeout": None,
                                     "job_id": None, "text_column": "text", "gpu": None, "fail_fast": False,
                                     "priority": None}
        with pytest.raises(InputError, match=rf"^{name}={value!r}: expected a whole number"):
            _check_arguments(**{**arguments, name: value})


# --- the generate task's bounds against vLLM's and against their copies in the gateway (issue 26, L2)

#: (parameter, the last value we take, the first we refuse) where vLLM's SamplingParams has a bound
ENGINE_EDGES = [("temperature", 2.0, 2.0 + 1e-9), ("top_p", 1.0, 1.0 + 1e-9), ("min_p", 1.0, 1.0 + 1e-9),
                ("presence_penalty", 2.0, 2.0 + 1e-9), ("frequency_penalty", -2.0, -2.0 - 1e-9)]


@pytest.mark.parametrize("name,last,first", ENGINE_EDGES)
def test_generate_bounds_are_vllms(name: str, last: float, first: float) -> None:
    pytest.importorskip("vllm", reason="the vllm package is missing")
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    Generate().check_options({name: last})
    SamplingParams(**{name: last})
    with pytest.raises(InputError, match=name):
        Generate().check_options({name: first})
    with pytest.raises(VLLMValidationError, match=name):
        SamplingParams(**{name: first})


def test_the_gateways_schemas_of_the_generate_bounds_agree() -> None:
    from bitinglip.gateway.openai.bodies import ChatCompletionRequest, CompletionRequest
    from bitinglip.gateway.schemas import schema
    from bitinglip.platform.tasks import Sampling, bound

    for body in (ChatCompletionRequest, CompletionRequest):
        # each sampling field is the contract's or null; the contract's alternative carries the bounds
        fields = {name: next(s for s in f["anyOf"] if s["type"] != "null") if "anyOf" in f else f
                  for name, f in schema(body)["properties"].items()}
        assert fields["temperature"]["maximum"] == bound(Sampling, "temperature").high == 2
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
            low = fields[name].get("minimum", fields[name].get("exclusiveMinimum"))
            high = fields[name].get("maximum")
            Generate().check_options({name: high if high is not None else 1.0})
            if "exclusiveMinimum" in fields[name]:
                with pytest.raises(InputError):
                    Generate().check_options({name: low})
            else:
                Generate().check_options({name: low})
