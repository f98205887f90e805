"""The ``bitinglip`` command, run as a user runs it: a subprocess."""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import free_port


def bitinglip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bitinglip", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.cluster
def test_run_embeds_a_sample_corpus_to_parquet(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = bitinglip("run", "--task", "embed", "--model", "all-MiniLM-L6-v2", "--input", "sample:300",
                     "--output", str(out), "--workers", "2", "--partition-rows", "100")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 300 and summary["output"] == str(out)
    dashboard = re.search(r"dashboard: (http\S+)/status, jobs: (http\S+/jobs)", proc.stderr)
    assert dashboard is not None, proc.stderr  # the Jobs page of the embedded cluster, next to its dashboard
    assert "rows/s" in proc.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_out"] == 300 and len(manifest["partitions"]) == 3
    df = pd.concat(pd.read_parquet(out / p["file"]) for p in manifest["partitions"])
    assert df["id"].tolist() == list(range(300)) and len(df["embedding"].iloc[0]) == 384


@pytest.mark.cluster
def test_run_reads_a_jsonl_file_with_options(tmp_path: Path, tiny_classifier: Path) -> None:
    src = tmp_path / "tickets.jsonl"
    pd.DataFrame({"id": ["t1", "t2", "t3"], "body": ["refund please", "great app", "it crashed"]}).to_json(
        src, orient="records", lines=True)
    out = tmp_path / "out"
    proc = bitinglip("run", "--task", "classify", "--model", str(tiny_classifier), "--input", str(src),
                     "--text-column", "body", "--option", "top_k=2", "--output", str(out), "--workers", "1",
                     "--quiet")
    assert proc.returncode == 0, proc.stderr
    df = pd.read_parquet(out / "part-00000.parquet")
    assert df["id"].tolist() == ["t1", "t2", "t3"] and df["labels"].map(len).tolist() == [2, 2, 2]


@pytest.mark.cluster
def test_run_says_an_engine_fallback_on_the_console(tmp_path: Path, tiny_gpt2: Path) -> None:
    """A model vLLM cannot run (the tiny GPT-2's heads are 16 wide) runs on the transformers engine:
    the user running the command sees one WARNING naming why, not only the worker's log."""
    proc = bitinglip("run", "--task", "generate", "--model", str(tiny_gpt2), "--input", "sample:4",
                     "--option", "max_tokens=2", "--output", str(tmp_path / "out"), "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "transformers engine" in line]
    assert len(said) == 1 and "transformers engine, not vLLM" in said[0] and ("head sizes" in said[0] or "vllm package is not installed" in said[0]), proc.stderr
    # a generate run ends on new tokens and tokens/s, the figure a generation user compares
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    written = int(pd.read_parquet(tmp_path / "out", columns=["completion_tokens"])["completion_tokens"].sum())
    assert summary["new_tokens"] == written > 0 and summary["new_tokens_per_s"] > 0, summary
    assert f"{written} new tokens" in proc.stderr


def test_sample_chat_writes_chats_for_generate(tmp_path: Path) -> None:
    from bitinglip.cli import _sample_input
    from bitinglip.errors import InputError

    frame = pd.read_parquet(_sample_input("sample-chat:30", str(tmp_path)))
    assert list(frame.columns) == ["messages"] and len(frame) == 30
    roles = [[m["role"] for m in chat] for chat in frame["messages"]]
    assert all(r in (["user"], ["system", "user"]) for r in roles) and ["system", "user"] in roles
    assert len({chat[-1]["content"] for chat in frame["messages"]}) > 10  # varied questions
    with pytest.raises(InputError, match="at least 1"):
        _sample_input("sample-chat:0", str(tmp_path))


def test_bad_arguments_say_what_is_wrong(tmp_path: Path) -> None:
    proc = bitinglip("run", "--task", "summarise", "--model", "m", "--input", "sample:5")
    assert proc.returncode == 1 and "unknown task 'summarise'" in proc.stderr
    proc = bitinglip("run", "--task", "embed", "--model", "m", "--input", str(tmp_path / "missing.parquet"))
    assert proc.returncode == 1 and "missing.parquet" in proc.stderr and "does not exist" in proc.stderr
    proc = bitinglip("run", "--task", "embed", "--model", "m", "--input", "sample:5", "--option", "normalize")
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr
    proc = bitinglip("run", "--task", "embed", "--model", "m", "--input", "sample:5", "--option", "colour=red")
    assert proc.returncode == 1 and "no option 'colour'" in proc.stderr
    proc = bitinglip("run", "--task", "embed", "--model", "m", "--input", "sample:5", "--workers", "0")
    assert proc.returncode == 2 and "at least 1" in proc.stderr
    proc = bitinglip("run", "--task", "embed", "--model", "m", "--input", "sample:5", "--priority", "11")
    assert proc.returncode == 2 and "priority=11: expected a whole number from 1 to 10" in proc.stderr


def test_unknown_model_fails_with_a_clear_message(tmp_path: Path) -> None:
    proc = bitinglip("run", "--task", "embed", "--model", "no-such-model", "--input", "sample:5",
                     "--output", str(tmp_path / "o"), "--workers", "1", "--quiet")
    assert proc.returncode == 1
    assert "unknown model 'no-such-model'" in proc.stderr
    # checked on this machine before a cluster starts: no worker tracebacks before the message
    assert "starting workers" not in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_wrong_text_column_and_gpu_are_named_by_their_flags_before_a_cluster(tmp_path: Path) -> None:
    src = tmp_path / "tickets.parquet"
    pd.DataFrame({"body": ["refund please", "great app"]}).to_parquet(src)
    proc = bitinglip("run", "--task", "embed", "--model", "all-MiniLM-L6-v2", "--input", str(src), "--quiet")
    assert proc.returncode == 1 and "no column 'text'" in proc.stderr and "columns: body" in proc.stderr
    assert "--text-column" in proc.stderr and "text_column=" not in proc.stderr
    assert "starting workers" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    from bitinglip.platform.cluster.local import gpu_count

    if gpu_count():
        return  # --gpu is right on this machine; the rest needs one without a GPU
    proc = bitinglip("run", "--task", "embed", "--model", "all-MiniLM-L6-v2", "--input", "sample:5", "--gpu")
    assert proc.returncode == 1 and "--gpu" in proc.stderr and "no visible GPU" in proc.stderr
    assert "gpu=False" not in proc.stderr and "starting workers" not in proc.stderr, proc.stderr


def test_errors_deep_down_are_reworded_with_flags() -> None:
    from bitinglip.cli_checks import cli_words

    assert cli_words("the input has no column 'text' (columns: a); name the text column with text_column=") == \
        "the input has no column 'text' (columns: a); name the text column with --text-column"
    assert cli_words("start workers with `dask worker ADDRESS --resources GPU=1` or submit with gpu=False") == \
        "start workers with `dask worker ADDRESS --resources GPU=1` or run with --cpu"
    assert cli_words("partition_rows=0: expected a whole number") == "--partition-rows 0: expected a whole number"


def test_every_option_of_every_subcommand_has_help() -> None:
    from bitinglip.cli import build_parser

    missing = []
    parsers = [("bitinglip", build_parser())]
    while parsers:
        name, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {verb}", p) for verb, p in action.choices.items()]
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_a_missing_extra_is_one_line_saying_what_to_install() -> None:
    # as without the gateway extra: importing its packages fails
    code = ("import sys; sys.modules['jwt'] = sys.modules['uvicorn'] = None\n"
            "from bitinglip.cli import main; sys.exit(main(sys.argv[1:]))")
    for argv in (["token", "--sub", "me", "--scope", "admin"], ["gateway", "--port", str(free_port())]):
        proc = _python(code, *argv)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == (f"bitinglip {argv[0]}: the Python package "
                                       f"{'jwt' if argv[0] == 'token' else 'uvicorn'!r} is not installed "
                                       "(the 'gateway' extra); pip install 'bitinglip[gateway]'")


def test_a_busy_port_or_a_dead_scheduler_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for argv in (["scheduler", "--host", "127.0.0.1", "--port", port],
                     ["gateway", "--host", "127.0.0.1", "--port", port]):
            proc = bitinglip(*argv, timeout=120)
            assert proc.returncode == 2, proc.stderr
            assert f"--port {port}: in use on 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr
            assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1, proc.stdout + proc.stderr
    proc = bitinglip("worker", f"tcp://127.0.0.1:{free_port()}", "--no-restart", "--nworkers", "1", timeout=120)
    assert proc.returncode == 1 and "cannot reach the scheduler at tcp://127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.cluster
def test_resume_skips_committed_partitions(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = bitinglip("run", "--task", "embed", "--model", "all-MiniLM-L6-v2", "--input", "sample:200",
                     "--output", str(out), "--workers", "1", "--partition-rows", "50", "--quiet")
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(proc.stdout.strip().splitlines()[-1])
    (out / "part-00002.parquet").unlink()  # as if the job had died before this partition
    (out / "_manifest.json").unlink()
    proc = bitinglip("resume", str(out), "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["skipped_partitions"] == 3 and summary["partitions"] == 4
    assert summary.keys() == ran.keys()  # one shape for the last line of run and resume
    assert (summary["job"], summary["task"], summary["rows"]) == (ran["job"], "embed", 200)
    df = pd.concat(pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet")))
    assert df["id"].tolist() == list(range(200))
    proc = bitinglip("resume", str(tmp_path / "nothing-here"), "--workers", "1")
    assert proc.returncode == 1 and "no job record" in proc.stderr


def test_resume_without_a_job_record_starts_no_cluster(tmp_path: Path) -> None:
    proc = bitinglip("resume", str(tmp_path / "nothing-here"), "--workers", "1")
    assert proc.returncode == 1 and "no job record (_job.json)" in proc.stderr
    assert "dashboard:" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "_job.json").write_text(json.dumps({
        "job_id": "j", "task": "embed", "model": "all-MiniLM-L6-v2", "input": str(tmp_path / "gone.parquet")}))
    proc = bitinglip("resume", str(tmp_path / "moved"), "--workers", "1")
    assert proc.returncode == 1 and "gone.parquet' does not exist (any more); give it with --input" in proc.stderr
    assert "dashboard:" not in proc.stderr, proc.stderr
