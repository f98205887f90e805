"""The data path on real files and the session's real cluster: inputs in,
Parquet results out, and the count invariant "rows in = rows out + rows in
error" (issues 13 and 14)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bitinglip.errors import InputError, OutputConflictError, OutputWriteError, RowCountError
from bitinglip.platform.jobs.job import Job
from bitinglip.platform.jobs.outputs import claim, write_manifest
from bitinglip.platform.jobs.sample import sample_corpus


def texts(n: int, tag: str = "t") -> list[str]:
    return [f"{tag} row {i} says {'word ' * (i % 7)}" for i in range(n)]


def write_parquet_files(folder: Path, files: int, rows: int, text_column: str = "text", tag: str = "f") -> list[str]:
    """``files`` Parquet files with an id, the text and two more columns."""
    folder.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for k in range(files):
        frame = pd.DataFrame({"id": [f"{tag}{k}-{i}" for i in range(rows)], text_column: texts(rows, f"{tag}{k}"),
                              "score": range(rows), "note": ["x" * 40] * rows})
        frame.to_parquet(folder / f"data-{k}.parquet")
        ids += frame["id"].tolist()
    return ids


# --- 13.1: a multi-file Parquet input keeps every row ------------------------

@pytest.mark.parametrize("kind", ["directory", "dask"])
def test_a_multi_file_parquet_input_keeps_every_row(platform, tiny_encoder: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    kind: str) -> None:
    import dask.dataframe as dd

    ids = write_parquet_files(tmp_path / "in", files=2, rows=300)
    inputs: Any = str(tmp_path / "in") if kind == "directory" else dd.read_parquet(str(tmp_path / "in"))
    job = platform.submit("embed", model=str(tiny_encoder), inputs=inputs, output=tmp_path / "out")
    df = job.result()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert (manifest["rows"], manifest["rows_out"], manifest["state"]) == (600, 600, "succeeded")
    assert sorted(df["id"]) == sorted(ids)


def test_a_manifest_whose_counts_disagree_fails_the_job(tmp_path: Path) -> None:
    record = {"job_id": "j1", "rows": 600, "partitions": 2}
    summaries = [{"part": 0, "rows": 290, "errors": 10}, {"part": 1, "rows": 0, "errors": 0}]
    with pytest.raises(RowCountError, match=r"rows out \(290\) plus rows in error \(10\) make 300.*600"):
        write_manifest(summaries, str(tmp_path), record)
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert manifest["state"] == "failed" and "600" in manifest["error"]
    assert write_manifest(summaries[:1], str(tmp_path), {**record, "rows": 300})["state"] == "succeeded"


def test_an_in_memory_job_whose_counts_disagree_fails(platform, tiny_encoder: Path) -> None:  # type: ignore[no-untyped-def]
    job = platform.submit("embed", model=str(tiny_encoder), inputs=texts(15))
    job.wait()
    # the same real partitions, planned as 10 rows: 15 come out, so rows were made up
    wrong = Job(platform, job.spec, job.futures, [10])
    with pytest.raises(RowCountError, match="input has 10 rows"):
        wrong.wait()
    assert wrong.status() == "failed"
    with pytest.raises(RowCountError):
        wrong.result()
    assert Job(platform, job.spec, job.futures, [15]).status() == "succeeded"


# --- 13.2: an output folder with bad rows reads back as the results ----------

def test_an_output_folder_with_bad_rows_reads_as_the_results(platform, tiny_encoder: Path,  # type: ignore[no-untyped-def]
                                                             tmp_path: Path) -> None:
    import dask.dataframe as dd
    import pyarrow.parquet as pq

    rows: list[Any] = texts(40)
    rows[3], rows[25] = 5, None  # bad rows: they go to the errors tables
    out = tmp_path / "out"
    job = platform.submit("embed", model=str(tiny_encoder), inputs=rows, output=out, partition_rows=20)
    assert len(job.result()) == 38 and sorted(job.errors()["id"]) == [3, 25]
    for frame in (pd.read_parquet(out), pq.read_table(out).to_pandas(), dd.read_parquet(str(out)).compute()):
        assert {"id", "embedding", "truncated"} <= set(frame.columns) and "reason" not in frame.columns
        assert sorted(frame["id"]) == [i for i in range(40) if i not in (3, 25)]
    assert sorted(p.name for p in (out / "_errors").iterdir()) == ["part-00000.errors", "part-00001.errors"]

    # a resumed job finds the committed errors where they now live
    (out / "part-00001.parquet").unlink()
    resumed = job.resume()
    assert sorted(resumed.errors()["id"]) == [3, 25] and len(resumed.result()) == 38
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["rows_out"], manifest["rows_in_error"], manifest["state"]) == (38, 2, "succeeded")
    assert [p["skipped"] for p in manifest["partitions"] if "skipped" in p] == [True]
    assert sorted(pd.read_parquet(out / "_errors")["id"]) == [3, 25]  # the errors tables read as one too


# --- 13.3: a job resumes from its record alone --------------------------------

def _interrupted_job(platform: Any, tiny_encoder: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A finished job on a Parquet file whose text is in ``body`` (one row
    null), then two of its four part files deleted, as if it had stopped."""
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(80)], "body": texts(80), "other": range(80)})
    frame.loc[7, "body"] = None
    frame.to_parquet(tmp_path / "in.parquet")
    out = tmp_path / "out"
    job = platform.submit("embed", model=str(tiny_encoder), inputs=tmp_path / "in.parquet", output=out,
                          text_column="body", partition_rows=20, retries=1, normalize=True)
    assert len(job.result()) == 79
    for part in ("part-00000.parquet", "part-00002.parquet"):
        (out / part).unlink()
    (out / "_errors" / "part-00000.errors").unlink()
    return out, frame["id"].tolist()


def _check_every_row_once(out: Path, ids: list[str]) -> None:
    import dask.dataframe as dd

    for frame in (pd.read_parquet(out), dd.read_parquet(str(out)).compute()):
        assert sorted(frame["id"]) == sorted(i for i in ids if i != "r7")
    assert pd.read_parquet(out / "_errors")["id"].tolist() == ["r7"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["rows"], manifest["rows_out"], manifest["rows_in_error"], manifest["state"]) == (
        80, 79, 1, "succeeded")
    assert sum(1 for p in manifest["partitions"] if p.get("skipped")) == 2


def test_resume_with_nothing_but_the_output_directory(platform, tiny_encoder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    out, ids = _interrupted_job(platform, tiny_encoder, tmp_path)
    record = json.loads((out / "_job.json").read_text())
    assert (record["text_column"], record["retries"], record["options"]["normalize"]) == ("body", 1, True)
    resumed = platform.resume(out)
    assert resumed.spec.text_column == "body" and resumed.spec.retries == 1
    df = resumed.result()
    assert np.allclose(np.linalg.norm(np.stack(df["embedding"].to_numpy()), axis=1), 1.0, atol=1e-4)
    _check_every_row_once(out, ids)


def test_a_resume_submits_the_spec_its_record_holds(platform, tiny_encoder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``_job.json`` is the job's spec (issue 22): a resume from it alone submits the same spec again."""
    pd.DataFrame({"id": range(40), "body": texts(40)}).to_parquet(tmp_path / "in.parquet")
    out = tmp_path / "out"
    job = platform.submit("embed", model=str(tiny_encoder), inputs=tmp_path / "in.parquet", output=out,
                          text_column="body", partition_rows=20, retries=2, timeout=600, token_budget=777,
                          fail_fast=True, tenant="acme", normalize=True)
    assert len(job.result()) == 40
    (out / "part-00001.parquet").unlink()
    resumed = platform.resume(out)
    assert resumed.spec.model_dump(exclude={"deadline"}) == job.spec.model_dump(exclude={"deadline"})
    assert resumed.spec.worker.token_budget == 777 and resumed.spec.reuse is not None
    assert resumed.spec.deadline > job.spec.deadline  # a resume starts its timeout again
    assert [s.get("skipped", False) for s in resumed.summaries()] == [True, False]


def test_cli_resume_with_nothing_but_the_output_directory(platform, tiny_encoder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sys

    out, ids = _interrupted_job(platform, tiny_encoder, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "bitinglip", "resume", str(out), "--workers", "1", "--quiet"],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _check_every_row_once(out, ids)


# --- 13.4: one rule for empty text in every format ---------------------------

EDGE_TEXTS = ["hello", "", "NA", "null", "  ", "world"]


@pytest.mark.parametrize("kind", ["pandas", "parquet", "jsonl", "csv"])
def test_empty_text_is_a_text_in_every_format(platform, tiny_encoder: Path, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    frame = pd.DataFrame({"id": range(len(EDGE_TEXTS)), "text": EDGE_TEXTS})
    inputs: Any = frame
    if kind == "parquet":
        frame.to_parquet(inputs := tmp_path / "in.parquet")
    elif kind == "jsonl":
        frame.to_json(inputs := tmp_path / "in.jsonl", orient="records", lines=True)
    elif kind == "csv":
        frame.to_csv(inputs := tmp_path / "in.csv", index=False)
    job = platform.submit("embed", model=str(tiny_encoder), inputs=inputs)
    want = platform.submit("embed", model=str(tiny_encoder), inputs=EDGE_TEXTS).result()
    got = job.result()
    assert job.errors().empty and got["id"].tolist() == list(range(len(EDGE_TEXTS)))
    np.testing.assert_allclose(np.stack(got["embedding"].to_numpy()), np.stack(want["embedding"].to_numpy()),
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["list", "pandas", "parquet", "jsonl"])
def test_only_a_real_null_is_a_missing_text(platform, tiny_encoder: Path, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    rows: list[Any] = ["hello", None, ""]
    frame = pd.DataFrame({"id": range(3), "text": rows})
    inputs: Any = rows if kind == "list" else frame
    if kind == "parquet":
        frame.to_parquet(inputs := tmp_path / "in.parquet")
    elif kind == "jsonl":
        frame.to_json(inputs := tmp_path / "in.jsonl", orient="records", lines=True)
    job = platform.submit("embed", model=str(tiny_encoder), inputs=inputs)
    assert job.result()["id"].tolist() == [0, 2]
    errors = job.errors()
    assert errors["id"].tolist() == [1] and "missing (null)" in errors["reason"][0]


# --- 14.2: one output directory, one job -------------------------------------

def _claim_at_once(out_dir: str, job_id: str, barrier: Any) -> str:
    barrier.wait()
    try:
        claim(out_dir, {"job_id": job_id, "task": "embed", "model": "m", "fingerprint": job_id})
        return "won"
    except OutputConflictError:
        return "refused"


def test_claiming_an_output_directory_is_atomic(tmp_path: Path) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    contenders = 6
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(contenders, mp_context=ctx) as pool:
        for round_ in range(10):
            out = tmp_path / f"out{round_}"
            barrier = manager.Barrier(contenders)
            results = list(pool.map(_claim_at_once, [str(out)] * contenders,
                                    [f"job{round_}-{i}" for i in range(contenders)], [barrier] * contenders))
            assert sorted(results) == ["refused"] * (contenders - 1) + ["won"], results
            winner = results.index("won")
            assert json.loads((out / "_job.json").read_text())["job_id"] == f"job{round_}-{winner}"
            assert [p.name for p in out.iterdir()] == ["_job.json"]  # no temporary file left behind


def test_two_jobs_on_one_output_directory_one_wins(platform, tiny_encoder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import threading

    out = tmp_path / "out"
    barrier = threading.Barrier(2)
    outcome: dict[str, Any] = {}

    def submit(name: str) -> None:
        barrier.wait()
        try:
            outcome[name] = platform.submit("embed", model=str(tiny_encoder), inputs=texts(50, name), output=out,
                                            job_id=f"job-{name}", partition_rows=20).result()
        except OutputConflictError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=submit, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    won = [n for n, o in outcome.items() if isinstance(o, pd.DataFrame)]
    assert len(won) == 1 and isinstance(outcome[{"a": "b", "b": "a"}[won[0]]], OutputConflictError), outcome
    assert json.loads((out / "_manifest.json").read_text())["job_id"] == f"job-{won[0]}"
    assert json.loads((out / "_job.json").read_text())["job_id"] == f"job-{won[0]}"
    embedded = pd.read_parquet(out)
    assert len(embedded) == 50 and embedded["embedding"].map(len).eq(len(outcome[won[0]]["embedding"][0])).all()
    assert embedded.sort_values("id")["embedding"].map(list).tolist() == outcome[won[0]]["embedding"].map(list).tolist()


def test_a_committed_file_of_another_job_is_an_error_not_a_skip(platform, tiny_encoder: Path,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    import shutil

    ours = platform.submit("embed", model=str(tiny_encoder), inputs=texts(40, "ours"), output=tmp_path / "ours",
                           partition_rows=20)
    ours.wait()
    platform.submit("embed", model=str(tiny_encoder), inputs=texts(40, "theirs"), output=tmp_path / "theirs",
                    partition_rows=20).wait()
    shutil.copy(tmp_path / "theirs" / "part-00001.parquet", tmp_path / "ours" / "part-00001.parquet")
    with pytest.raises(OutputConflictError, match=f"part-00001.parquet holds the results of job .*not of job {ours.id}"):
        ours.resume().result()



def test_a_foreign_errors_table_is_an_error_too(tmp_path: Path) -> None:
    from bitinglip.platform.jobs.outputs import committed_summary, write_parquet

    write_parquet(pd.DataFrame({"id": [1], "embedding": [[0.5]]}), str(tmp_path / "part-00000.parquet"), "ours")
    write_parquet(pd.DataFrame({"id": [2], "reason": ["bad"]}), str(tmp_path / "_errors" / "part-00000.errors"),
                  "theirs")
    with pytest.raises(OutputConflictError, match="part-00000.errors holds the results of job theirs, not of job ours"):
        committed_summary(str(tmp_path), 0, "ours")
    assert committed_summary(str(tmp_path), 1, "ours") is None

# --- 14.8: a full results disk -----------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, so that writes run out of space for real."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(reason=f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int = 0) -> None:
    """Take all the space of ``disk`` but ``leave`` bytes."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:  # full
        pass
    finally:
        os.close(fd)
    os.truncate(disk / "filler", max(0, os.path.getsize(disk / "filler") - leave))


def test_a_full_disk_is_an_output_write_error_and_leaves_no_temp_file(platform, tiny_encoder: Path,  # type: ignore[no-untyped-def]
                                                                      small_disk: Path) -> None:
    fill(small_disk)
    with pytest.raises(OutputWriteError, match=r"cannot write .*_job.json: no space left on device"):
        platform.submit("embed", model=str(tiny_encoder), inputs=texts(10), output=small_disk / "a")
    fill(small_disk, leave=8192)  # room for the record, not for 1000 embeddings (about 130 kB)
    job = platform.submit("embed", model=str(tiny_encoder), inputs=sample_corpus(1000, seed=1),
                          output=small_disk / "b", partition_rows=1000)
    with pytest.raises(OutputWriteError, match=r"cannot write .*part-00000.parquet: no space left on device"):
        job.result()
    assert job.status() == "failed"
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name]


# --- 14.3: a directory input reads nothing outside its root ------------------

def linked_input(tmp_path: Path) -> tuple[Path, Path]:
    """An input root whose ``data`` folder holds a real file, a link to a
    file inside the root and a link to a secret file outside it."""
    root, outside = tmp_path / "inputs", tmp_path / "elsewhere"
    write_parquet_files(root / "data", files=1, rows=30)
    write_parquet_files(root / "other", files=1, rows=10, tag="o")
    (root / "data" / "data-inside.parquet").symlink_to(root / "other" / "data-0.parquet")
    outside.mkdir()
    pd.DataFrame({"id": ["s1", "s2"], "text": ["secret one", "secret two"]}).to_parquet(outside / "secret.parquet")
    (root / "data" / "data-leak.parquet").symlink_to(outside / "secret.parquet")
    return root, outside


def test_a_link_out_of_the_input_root_is_refused(platform, tiny_encoder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, outside = linked_input(tmp_path)
    with pytest.raises(InputError, match=r"data-leak.parquet' leads to .*secret.parquet', outside the input directory"):
        platform.submit("embed", model=str(tiny_encoder), inputs=root / "data", input_root=root)
    (root / "data" / "data-leak.parquet").unlink()
    (root / "data" / "more").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputError, match=r"input folder .*more' leads to .*elsewhere', outside the input directory"):
        platform.submit("embed", model=str(tiny_encoder), inputs=root / "data", input_root=root)
    (root / "data" / "more").unlink()
    # links that stay inside the root are read, each file once
    df = platform.submit("embed", model=str(tiny_encoder), inputs=root / "data", input_root=root).result()
    assert len(df) == 40 and df["id"].is_unique


def test_the_files_checked_are_the_files_read(tmp_path: Path) -> None:
    from bitinglip.platform.jobs.inputs import parquet_files

    root, outside = linked_input(tmp_path)
    (root / "data" / "data-leak.parquet").unlink()
    (root / "data" / "_hidden.parquet").symlink_to(outside / "secret.parquet")  # skipped, as readers skip it
    files = parquet_files(root / "data", root.resolve())
    assert files == [(root / "data" / "data-0.parquet").resolve(), (root / "other" / "data-0.parquet").resolve()]
