"""The ``bitinglip`` command, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd


def bitinglip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bitinglip", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_run_embeds_a_sample_corpus_to_parquet(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = bitinglip("run", "--task", "embed", "--model", "all-MiniLM-L6-v2", "--input", "sample:300",
                     "--output", str(out), "--workers", "2", "--partition-rows", "100")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 300 and summary["output"] == str(out)
    assert "dashboard: http" in proc.stderr
    assert "rows/s" in proc.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows_out"] == 300 and len(manifest["partitions"]) == 3
    df = pd.concat(pd.read_parquet(out / p["file"]) for p in manifest["partitions"])
    assert df["id"].tolist() == list(range(300)) and len(df["embedding"].iloc[0]) == 384


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


def test_unknown_model_fails_with_a_clear_message(tmp_path: Path) -> None:
    proc = bitinglip("run", "--task", "embed", "--model", "no-such-model", "--input", "sample:5",
                     "--output", str(tmp_path / "o"), "--workers", "1", "--quiet")
    assert proc.returncode == 1
    assert "unknown model 'no-such-model'" in proc.stderr


def test_resume_skips_committed_partitions(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = bitinglip("run", "--task", "embed", "--model", "all-MiniLM-L6-v2", "--input", "sample:200",
                     "--output", str(out), "--workers", "1", "--partition-rows", "50", "--quiet")
    assert proc.returncode == 0, proc.stderr
    (out / "part-00002.parquet").unlink()  # as if the job had died before this partition
    (out / "_manifest.json").unlink()
    proc = bitinglip("resume", str(out), "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["skipped_partitions"] == 3 and summary["partitions"] == 4
    df = pd.concat(pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet")))
    assert df["id"].tolist() == list(range(200))
    proc = bitinglip("resume", str(tmp_path / "nothing-here"), "--workers", "1")
    assert proc.returncode == 1 and "no job record" in proc.stderr
