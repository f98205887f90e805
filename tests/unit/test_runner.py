"""The partition runner without a cluster: a fake worker records the events a
partition sends, a fake model plugin hands out a model-free task."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

from bitinglip.errors import InputError
from bitinglip.platform.jobs import runner
from bitinglip.platform.jobs.client import Platform, _faults
from bitinglip.platform.jobs.runner import SUMMARY_TOPIC, predict_texts, run_partition
from bitinglip.platform.jobs.spec import JobSpec, WorkerSettings
from bitinglip.platform.plugins import model_plugin
from bitinglip.platform.plugins.budgets import ReducedBudgets
from bitinglip.platform.tasks import builtin
from bitinglip.platform.tasks.builtin import Batch, Loaded, TaskType
from bitinglip.settings import Settings


class Length(TaskType):
    """One output per text: its length.  A text containing "bad" fails its
    batch; one token per character, so costs are predictable."""

    name = "length"
    columns = ("length",)

    def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
        return Loaded(model=None)

    def tokenize(self, loaded: Loaded, texts: list[str], options: Mapping[str, Any]
                 ) -> tuple[list[list[int]], list[bool]]:
        return [[1] * len(t) for t in texts], [False] * len(texts)

    def predict(self, loaded: Loaded, batch: Batch, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        if any("bad" in t for t in batch.texts):
            raise ValueError("bad text")
        return [{"length": len(t)} for t in batch.texts]


class FakeWorker:
    address = "tcp://fake:1"

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def log_event(self, topic: str, msg: dict[str, Any]) -> None:
        self.events.append((topic, msg))


class FakePlugin:
    def __init__(self) -> None:
        self.holders: list[Any] = []
        self.in_use = 0
        self.budgets = ReducedBudgets()

    def get(self, task: TaskType, model: str, options: Mapping[str, Any], holder: Any = None) -> Loaded:
        self.holders.append(holder)
        return task.load(model, "cpu", options)

    @contextmanager
    def use(self, task: TaskType, model: str, options: Mapping[str, Any]) -> Iterator[Loaded]:
        self.in_use += 1
        try:
            yield task.load(model, "cpu", options)
        finally:
            self.in_use -= 1


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> FakeWorker:
    fake = FakeWorker()
    monkeypatch.setattr(runner, "_current_worker", lambda: fake)
    monkeypatch.setattr(runner, "_worker_address", lambda: fake.address)
    return fake


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> FakePlugin:
    fake = FakePlugin()
    monkeypatch.setattr(model_plugin, "get_model_plugin", lambda: fake)
    return fake


def test_a_partition_reports_its_start_and_summary_itself(worker: FakeWorker, plugin: FakePlugin) -> None:
    spec = JobSpec(job_id="job-1", task=Length(), model="m")
    summary = run_partition(["a", "bb", "bad"], spec, 3, 0)
    assert summary["rows"] == 2 and summary["errors"] == 1
    assert plugin.holders == ["bitinglip-job-1-3"]  # the model is held for this very task
    sent = [msg for topic, msg in worker.events if topic == SUMMARY_TOPIC]
    assert sent[0] == {"job": "job-1", "task": "length", "model": "m", "phase": "start"}
    done = sent[1]
    assert {k: done[k] for k in ("job", "task", "model", "phase", "part", "skipped", "rows", "errors")} == {
        "job": "job-1", "task": "length", "model": "m", "phase": "done", "part": 3, "skipped": False,
        "rows": 2.0, "errors": 1.0}
    assert "frame" not in done and len(sent) == 2


def _predict(texts: list[str], budget: int = 1000, **kw: Any) -> tuple[Any, ...]:
    task = Length()
    return runner.predict_rows(task, task.load("", "cpu", {}), texts, {}, budget, **kw)


def test_a_bad_row_fails_alone_and_empty_rows_are_named() -> None:
    outputs, truncated, failed, stats = _predict(["aa", "bad", "", "ccc"])
    assert outputs == [{"length": 2}, None, None, {"length": 3}] and truncated == [False] * 4
    assert failed == {1: "ValueError: bad text", 2: "the text has no tokens for this model"}
    assert stats["batches"] == 1 and stats["tokens"] == 8 and stats["oom_splits"] == 0
    with pytest.raises(ValueError, match="bad text"):
        _predict(["aa", "bad"], fail_fast=True)
    with pytest.raises(InputError, match="row 1 of the partition has no tokens"):
        _predict(["aa", ""], fail_fast=True)


def test_out_of_memory_halves_the_batch_and_the_budget_is_remembered() -> None:
    budgets = ReducedBudgets()
    texts = ["abcd"] * 8  # one batch of 32 tokens under a budget of 1000
    faults = {"oom_above_tokens": 10}
    outputs, _, failed, stats = _predict(texts, model_key="length:m:cpu", faults=faults, budgets=budgets)
    assert outputs == [{"length": 4}] * 8 and not failed
    assert stats["oom_splits"] == 3  # 32 -> 16 + 16 -> each 16 -> 8 + 8
    assert budgets.as_dict() == {"length:m:cpu": 8}
    _, _, _, again = _predict(texts, model_key="length:m:cpu", faults=faults, budgets=budgets)
    assert again["oom_splits"] == 0 and again["batches"] == 4  # planned at the remembered budget
    _, _, _, elsewhere = _predict(texts, model_key="length:m:cpu", faults=faults, budgets=ReducedBudgets())
    assert elsewhere["oom_splits"] == 3  # another worker has learned nothing yet


def test_a_partition_uses_its_workers_budgets(worker: FakeWorker, plugin: FakePlugin) -> None:
    spec = JobSpec(job_id="job-2", task=Length(), model="m",
                   worker=WorkerSettings(token_budget=1000, fault_oom_above_tokens=10))
    assert run_partition(["abcd"] * 8, spec, 0, 0)["oom_splits"] == 3
    assert plugin.budgets.as_dict() == {"length:m:cpu": 8}
    assert run_partition(["abcd"] * 8, spec, 1, 8)["oom_splits"] == 0


def test_a_partition_takes_its_token_budget_from_the_spec(worker: FakeWorker, plugin: FakePlugin) -> None:
    # the fake plugin has no settings at all: the budget can only come with the job
    assert not hasattr(plugin, "settings")
    spec = JobSpec(job_id="job-3", task=Length(), model="m", worker=WorkerSettings(token_budget=8))
    assert run_partition(["abcd"] * 8, spec, 0, 0)["batches"] == 4  # two rows of 4 tokens per batch
    wide = spec.model_copy(update={"worker": WorkerSettings(token_budget=1000)})
    assert run_partition(["abcd"] * 8, wide, 1, 8)["batches"] == 1


def test_reduced_budgets_only_go_down_and_stay_consistent_across_threads() -> None:
    budgets = ReducedBudgets()
    assert budgets.cap("k", 500) == 500
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda size: budgets.reduce("k", 1000, size), range(2, 2000)))
    assert budgets.as_dict() == {"k": 1} and budgets.cap("k", 500) == 1
    budgets.reduce("k", 1000, 5000)  # a larger failure never raises the budget again
    assert budgets.cap("k", 500) == 1


def test_predict_texts_holds_the_model_for_the_call_and_fails_on_the_first_bad_text(
        plugin: FakePlugin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(builtin.BUILTIN_TASKS, "length", Length())
    assert predict_texts("length", "m", {}, ["a", "bcd"]) == [{"length": 1, "truncated": False},
                                                              {"length": 3, "truncated": False}]
    assert plugin.in_use == 0 and plugin.holders == []  # used, then let go; never held for a task key
    with pytest.raises(InputError, match=r"inputs\[1\] has no tokens for model 'm'"):
        predict_texts("length", "m", {}, ["a", ""])
    with pytest.raises(ValueError, match="bad text"):
        predict_texts("length", "m", {}, ["a", "bad"])


def test_faults_come_from_test_settings_not_from_submit() -> None:
    assert "faults" not in inspect.signature(Platform.submit).parameters
    assert _faults(Settings()) == {}
    assert _faults(Settings().with_(fault_oom_above_tokens=1200)) == {"oom_above_tokens": 1200}
    # not a deployment knob: the environment cannot switch it on
    assert Settings.from_env({"BITINGLIP_FAULT_OOM_ABOVE_TOKENS": "5"}).fault_oom_above_tokens == 0


def test_the_missing_text_column_has_one_message_everywhere(worker: FakeWorker, plugin: FakePlugin) -> None:
    import pandas as pd

    from bitinglip.platform.jobs.inputs import require_column

    words = r"the input has no column 'text' \(columns: id, body\); name the text column with text_column="
    with pytest.raises(InputError, match=words):
        require_column(["id", "body"], "text")
    with pytest.raises(InputError, match=words):  # the same on the worker
        run_partition(pd.DataFrame({"id": [1], "body": ["x"]}), JobSpec(job_id="j", task=Length(), model="m"), 0, 0)
    with pytest.raises(InputError, match=r"^--input 'a.csv' has no column 'text' \(columns: body\); .* --text-column$"):
        require_column(["body"], "text", "--input 'a.csv'", "--text-column")
    require_column(pd.Index(["text"]), "text")
