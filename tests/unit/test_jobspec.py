"""The job's contract without a cluster: JobSpec's fields and bounds, its size on the wire, and
``_job.json`` written from it and read back into it."""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bitinglip.errors import ConfigError, InputError, UnknownTaskError
from bitinglip.platform.jobs import RECORD, JobRecord, JobSpec, WorkerSettings, read_record
from bitinglip.platform.jobs.outputs import claim
from bitinglip.platform.jobs.reuse import ReuseSpec
from bitinglip.platform.tasks.builtin import Batch, Loaded, TaskType, get_task
from bitinglip.platform.tasks.contract import TASK_OPTIONS, bounded
from bitinglip.settings import Settings

FACTS: dict[str, Any] = {"model_version": "3", "gpu": None, "input_root": None, "input": "/data/in.parquet",
                         "fingerprint": "f00d", "partition_rows": 64, "partitions": 2, "rows": 100,
                         "submitted": 1_700_000_000.5}


class Echo(TaskType):
    """A task of the user's own: no option model, so its options are its own to check."""

    name = "echo"
    columns = ("text",)
    defaults: Mapping[str, Any] = {"suffix": "!"}

    def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
        return Loaded(model=None)

    def predict(self, loaded: Loaded, batch: Batch, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{"text": t} for t in batch.texts]


def _generate_spec(**changes: Any) -> JobSpec:
    task = get_task("generate")
    options = task.check_options({"stop": ["###", "END"], "temperature": 0.5, "seed": 7})
    return JobSpec(**{"job_id": "job-7", "task": task, "model": "tiny-llama", "options": options,
                      "text_column": "prompt", "output": "/results/job-7", "fail_fast": True, "retries": 2,
                      "timeout": 600.0, "deadline": 1_700_000_600.5, "reuse": ReuseSpec("acme"), "priority": 8,
                      "worker": WorkerSettings(token_budget=4096), **changes})


def _write(folder: Path, record: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD).write_text(json.dumps(record))
    return folder


def test_a_spec_names_its_task_and_types_its_options_by_the_tasks_contract() -> None:
    spec = JobSpec(job_id="j1", task="embed", model="m", options={"normalize": True, "dtype": "float16"})
    assert spec.task is get_task("embed") and spec.options == {"normalize": True, "dtype": "float16"}
    assert (spec.text_column, spec.retries, spec.worker.token_budget, spec.reuse) == ("text", 0, 0, None)
    with pytest.raises(ValueError, match=r"options\n.*temperature: Input should be less than or equal to 2"):
        JobSpec(job_id="j1", task="generate", model="m", options={"temperature": 2.5})
    with pytest.raises(ValueError, match=r"options\n.*normalise: Extra inputs are not permitted"):
        JobSpec(job_id="j1", task="embed", model="m", options={"normalise": True})
    with pytest.raises(ValueError, match=r"retries\n.*less than or equal to 100"):
        JobSpec(job_id="j1", task="embed", model="m", retries=101)
    with pytest.raises(ValueError, match=r"text_column\n.*expected a column name of 1 to 200 characters"):
        JobSpec(job_id="j1", task="embed", model="m", text_column="x" * 201)
    with pytest.raises(ValueError, match=r"job_id\n.*'a b': expected 1 to 128 letters"):
        JobSpec(job_id="a b", task="embed", model="m")
    with pytest.raises(UnknownTaskError, match="unknown task 'echo'"):
        JobSpec(job_id="j1", task="echo", model="m")
    with pytest.raises(ValueError, match="frozen"):
        spec.retries = 3  # type: ignore[misc]  # a partition cannot change its job
    # a task of the user's own travels as itself, and its options are not the contract's to judge
    echo = JobSpec(job_id="j1", task=Echo(), model="m", options={"suffix": "?"})
    assert echo.task.name == "echo" and echo.options == {"suffix": "?"}


@pytest.mark.parametrize("task", sorted(TASK_OPTIONS))
def test_the_spec_keeps_what_submits_checks_take_at_every_bound(task: str) -> None:
    """The option model and the hand-worded checks read one declaration: what ``check_options``
    takes at a bound, the spec takes too, value and type unchanged (what the workers and the
    result store's keys see)."""
    task_type, model = get_task(task), TASK_OPTIONS[task]
    given = [{name: edge} for name, b in bounded(model) for edge in (b.high, None if b.low_open else b.low)
             if edge is not None]
    if task == "generate":  # ints for floats, one stop string, a response format
        given.append({"temperature": 1, "top_p": 1, "stop": "x", "response_format": {"type": "json_object"}})
    for options in given:
        merged = task_type.check_options(options)
        kept = JobSpec(job_id="j", task=task, model="m", options=merged).options
        assert [(k, v, type(v)) for k, v in kept.items()] == [(k, v, type(v)) for k, v in merged.items()], options


def test_a_spec_is_small_on_the_wire() -> None:
    spec = _generate_spec()
    wire = pickle.dumps(spec)
    # every partition carries it: the task goes by reference to its class, and no Settings object
    # (about 1.5 kB pickled) rides along, only the values a partition uses
    assert len(wire) < 1024, len(wire)
    assert b"bitinglip.settings" not in wire and b"jwt" not in wire
    back = pickle.loads(wire)
    assert back.model_dump() == spec.model_dump() and type(back.task) is type(spec.task)


def test_worker_settings_are_the_clients_settings_of_the_same_names() -> None:
    assert set(WorkerSettings.model_fields) <= set(Settings.model_fields)
    settings = Settings().with_(token_budget=2000, fault_oom_above_tokens=50)
    assert WorkerSettings.from_settings(settings) == WorkerSettings(token_budget=2000, fault_oom_above_tokens=50)
    assert WorkerSettings.from_settings(settings, token_budget=300).token_budget == 300  # submit's argument wins
    assert WorkerSettings.from_settings(settings, token_budget=None).token_budget == 2000
    assert WorkerSettings.from_settings(settings).faults == {"oom_above_tokens": 50}
    assert WorkerSettings().faults == {}
    with pytest.raises(ConfigError, match=r"token_budget: Input should be less than or equal to 100000000"):
        WorkerSettings.from_settings(Settings().with_(token_budget=10**9))


def test_a_record_round_trips_into_the_same_spec(tmp_path: Path) -> None:
    spec = _generate_spec()
    record = JobRecord.of(spec, **FACTS).model_dump(mode="json")
    assert record["task"] == "generate" and record["options"]["stop"] == ["###", "END"]  # plain JSON
    assert record["reuse"] == {"tenant": "acme"} and record["worker"]["token_budget"] == 4096
    claim(str(tmp_path), record)
    read = read_record(tmp_path)
    assert read.spec() == spec  # the options' lists are tuples again, the task the same object
    assert read.model_dump(exclude=set(JobSpec.model_fields)) == FACTS
    assert read.resubmission() == {
        "options": spec.options, "text_column": "prompt", "partition_rows": 64, "token_budget": 4096,
        "fail_fast": True, "retries": 2, "timeout": 600.0, "priority": 8, "gpu": None, "input_root": None,
        "reuse": True, "tenant": "acme"}
    # a task of the user's own resolves among the platform's registered tasks
    echo = JobSpec(job_id="j2", task=Echo(), model="m", options={"suffix": "?"})
    folder = _write(tmp_path / "echo", JobRecord.of(echo, **FACTS).model_dump(mode="json"))
    with pytest.raises(UnknownTaskError, match="unknown task 'echo'"):
        read_record(folder)
    registered = {"echo": echo.task}
    assert read_record(folder, registered).spec() == echo


@pytest.mark.parametrize("field,value,words", [
    ("retries", 1000, "retries: Input should be less than or equal to 100 (got 1000)"),
    ("partitions", "many", "partitions: Input should be a valid integer"),
    ("text_column", "", "text_column: text_column='': expected a column name of 1 to 200 characters"),
    ("timeout", -5, "timeout: Input should be greater than 0 (got -5)"),
    ("job_id", "../x", "job_id: '../x': expected 1 to 128 letters"),
    ("options", {"temperature": 9}, "options: temperature: Input should be less than or equal to 2 (got 9)"),
    ("worker", {"token_budget": -1}, "worker.token_budget: Input should be greater than or equal to 0 (got -1)"),
    ("fingerprint", None, "fingerprint: Input should be a valid string"),
])
def test_a_record_with_a_bad_field_is_refused_naming_it(tmp_path: Path, field: str, value: Any, words: str) -> None:
    record = JobRecord.of(_generate_spec(), **FACTS).model_dump(mode="json")
    folder = _write(tmp_path, {**record, field: value})
    with pytest.raises(InputError) as caught:
        read_record(folder)
    assert str(caught.value).startswith(f"{folder / RECORD}: {words}"), str(caught.value)


def test_a_missing_or_broken_record_is_said_so(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"holds no job record \(_job.json\); nothing to resume"):
        read_record(tmp_path)
    (tmp_path / RECORD).write_text('{"job_id": "j", "task": "em')
    with pytest.raises(InputError, match=r"_job.json cannot be read as a job record"):
        read_record(tmp_path)
    _write(tmp_path, {"job_id": "j", "task": "embed"})
    with pytest.raises(InputError, match=r"model: Field required; fingerprint: Field required"):
        read_record(tmp_path)


def test_a_record_of_the_earlier_layout_still_resumes(tmp_path: Path) -> None:
    """The flat record submit wrote before the spec: submit's token_budget argument at the top, and
    reuse a flag beside the tenant."""
    earlier = {"job_id": "old-1", "task": "embed", "model": "all-MiniLM-L6-v2", "model_version": None,
               "options": {"dtype": "float32", "normalize": True, "pooling": None, "matmul_precision": "auto",
                           "count_tokens": False},
               "text_column": "body", "token_budget": None, "fail_fast": False, "retries": 1, "timeout": None,
               "gpu": None, "input_root": None, "reuse": True, "tenant": None, "fingerprint": "abc",
               "partition_rows": 20, "partitions": 4, "rows": 80, "submitted": 1.0, "input": "/in.parquet"}
    record = read_record(_write(tmp_path, earlier))
    assert record.worker == WorkerSettings() and record.reuse == ReuseSpec("local")
    assert record.resubmission()["token_budget"] is None and record.resubmission()["tenant"] == "local"
    assert record.spec().text_column == "body" and record.spec().options["normalize"] is True
    off = read_record(_write(tmp_path / "off", {**earlier, "reuse": False, "token_budget": 512}))
    assert off.reuse is None and off.worker.token_budget == 512


def test_cli_resume_names_a_bad_field_before_a_cluster_starts(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    record = JobRecord.of(JobSpec(job_id="j", task="embed", model="m"), **{**FACTS, "input": str(tmp_path / "in.jsonl")})
    folder = _write(tmp_path / "out", {**record.model_dump(mode="json"), "retries": -1})
    proc = subprocess.run([sys.executable, "-m", "bitinglip", "resume", str(folder), "--workers", "1"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "retries: Input should be greater than or equal to 0 (got -1)" in proc.stderr
    assert "dashboard:" not in proc.stderr, proc.stderr
