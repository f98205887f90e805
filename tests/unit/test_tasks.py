from collections.abc import Mapping
from typing import Any

import pytest

from bitinglip.errors import InputError, UnknownTaskError
from bitinglip.platform.tasks.builtin import (
    Batch,
    Generate,
    Loaded,
    TaskType,
    check_task_type,
    get_task,
    texts_or_error,
)


def test_builtin_tasks() -> None:
    assert {get_task(n).name for n in ("embed", "classify", "generate")} == {"embed", "classify", "generate"}


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(UnknownTaskError, match="embed"):
        get_task("summarise")


@pytest.mark.parametrize("task,options,word", [
    ("embed", {"normalise": True}, "normalise"),
    ("embed", {"dtype": "float8"}, "dtype"),
    ("classify", {"top_k": 0}, "top_k"),
    ("generate", {"max_new_tokens": -1}, "max_new_tokens"),
    ("generate", {"temperature": "hot"}, "temperature"),
    ("generate", {"stop": [""]}, "stop"),
])
def test_bad_options_are_refused_with_their_name(task: str, options: dict, word: str) -> None:
    with pytest.raises(InputError, match=word):
        get_task(task).check_options(options)


def test_generate_option_defaults_and_stop_string() -> None:
    merged = Generate().check_options({"stop": "\n", "seed": 3})
    assert merged["stop"] == ("\n",) and merged["seed"] == 3 and merged["max_tokens"] == 32


def test_non_string_row_is_named() -> None:
    with pytest.raises(InputError, match=r"row id=2: expected text \(str\), got int"):
        texts_or_error(["a", "b", 7], [0, 1, 2])


class _Stub(TaskType):
    """A task type with the two methods every task type must have."""

    def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
        return Loaded(model=None)

    def predict(self, loaded: Loaded, batch: Batch, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{} for _ in batch.texts]


def test_user_task_type_checks() -> None:
    class NoColumns(_Stub):
        name = "x"

    with pytest.raises(InputError):
        check_task_type(NoColumns())

    class ClashesWithId(_Stub):
        name = "y"
        columns = ("id",)

    with pytest.raises(InputError, match="id"):
        check_task_type(ClashesWithId())


def test_default_tokenize_without_tokenizer_uses_text_length() -> None:
    class Plain(_Stub):
        name = "plain"
        columns = ("n",)

    ids, truncated = Plain().tokenize(Loaded(model=None), ["abcd" * 10, "a"], {})
    assert [len(r) for r in ids] == [10, 1] and truncated == [False, False]


def test_partition_rows_for_cheap_and_costly_rows() -> None:
    from bitinglip.platform.jobs.inputs import MAX_PARTITION_ROWS, MIN_PARTITION_ROWS, partition_rows

    assert partition_rows(20_000, 2) == 2500  # about four per worker
    assert partition_rows(100, 2) == MIN_PARTITION_ROWS
    assert partition_rows(10**7, 2) == MAX_PARTITION_ROWS
    assert partition_rows(64, 2, minimum=Generate.min_partition_rows or 0) == 16
    assert partition_rows(64, 2, configured=7, minimum=16) == 7  # the user's choice wins


def test_dtypes_and_poolings_are_one_list_for_tasks_registry_and_cli() -> None:
    from bitinglip.platform.models import registry, registry_cli
    from bitinglip.platform.tasks.builtin import DTYPES, POOLINGS

    assert registry.DTYPES is registry_cli.DTYPES is DTYPES
    assert registry.POOLINGS is registry_cli.POOLINGS is POOLINGS
    embed = get_task("embed")
    for pooling in (None, *POOLINGS):
        assert embed.check_options({"pooling": pooling})["pooling"] == pooling
    for dtype in DTYPES:
        assert embed.check_options({"dtype": dtype})["dtype"] == dtype
    with pytest.raises(InputError, match="pooling"):
        embed.check_options({"pooling": "sum"})


def test_a_task_type_without_predict_fails_where_it_is_registered() -> None:
    from bitinglip.platform.jobs.client import Platform

    class NoPredict(TaskType):
        name = "nopredict"
        columns = ("x",)

        def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
            return Loaded(model=None)

    platform = Platform.__new__(Platform)  # register_task needs no cluster
    platform.tasks = {}
    with pytest.raises(TypeError, match="predict"):
        platform.register_task(NoPredict())  # type: ignore[abstract]
    assert platform.tasks == {}
    assert platform.register_task(_StubNamed()).name == "stub"


class _StubNamed(_Stub):
    name = "stub"
    columns = ("x",)
