"""Result reuse on a real cluster: a job takes only rows whose result cannot differ from a fresh run's.

One embedded cluster (one worker, so a fresh run has the same layout) and the
tiny random-weight encoder; a few hundred rows per job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from tiny_models import make_tiny_encoder

from bitinglip.errors import InputError
from bitinglip.platform.jobs import sample_corpus
from bitinglip.platform.jobs.reuse import store_root, tenant_folder
from bitinglip.settings import Settings

ROWS = 200


@pytest.fixture(scope="module")
def own_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import bitinglip

    settings = Settings(model_cache_dir=tmp_path_factory.mktemp("reuse-cache"))
    with bitinglip.connect(settings=settings, n_workers=1, dashboard_address=":0") as p:
        yield p


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return list(dict.fromkeys(sample_corpus(ROWS * 2, seed=5)))[:ROWS]  # distinct rows: counts are exact


def _store(platform: Any) -> Path:
    return store_root(platform.settings)


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.id) == list(b.id) and list(a.truncated) == list(b.truncated)
    for x, y in zip(a.embedding, b.embedding):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)


def _run(platform: Any, model: str, texts: list[str], **kw: Any) -> tuple[pd.DataFrame, int]:
    job = platform.submit("embed", model, texts, **kw)
    return job.result(), job.rows_reused()


def test_a_second_job_reuses_every_row_and_only_an_edited_row_runs(own_platform: Any, tiny_encoder: Path,
                                                                   texts: list[str], tmp_path: Path) -> None:
    model = str(tiny_encoder)
    first, reused = _run(own_platform, model, texts, tenant="t-edit")
    assert reused == 0
    again = own_platform.submit("embed", model, texts, tenant="t-edit", output=tmp_path / "out")
    _same(again.result(), first)
    assert again.rows_reused() == ROWS
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["rows_reused"] == ROWS and manifest["rows_out"] == ROWS
    assert again.progress(wait=False).rows_reused == ROWS  # what the progress events said
    edited = list(texts)
    edited[7] = edited[7] + "!"  # one character
    got, reused = _run(own_platform, model, edited, tenant="t-edit")
    assert reused == ROWS - 1
    fresh, none = _run(own_platform, model, edited, tenant="t-edit", reuse=False)
    assert none == 0
    _same(got, fresh)
    assert not np.array_equal(got.embedding[7], first.embedding[7])


def test_a_changed_option_or_another_tenant_reuses_nothing(own_platform: Any, tiny_encoder: Path,
                                                           texts: list[str]) -> None:
    model = str(tiny_encoder)
    _run(own_platform, model, texts[:50], tenant="t-opt")
    normalized, reused = _run(own_platform, model, texts[:50], tenant="t-opt", normalize=True)
    assert reused == 0
    assert np.allclose([np.linalg.norm(v) for v in normalized.embedding], 1.0, atol=1e-5)
    assert _run(own_platform, model, texts[:50], tenant="t-other")[1] == 0
    assert _run(own_platform, model, texts[:50], tenant="t-opt")[1] == 50


def test_a_re_registered_model_version_reuses_nothing(own_platform: Any, tiny_encoder: Path, texts: list[str],
                                                      tmp_path: Path) -> None:
    registry = own_platform.models
    fixed = {"matmul_precision": "highest"}  # no timed choice: only the weights tell the versions apart
    registry.add("reuse-enc", str(tiny_encoder), task="embed")
    _, reused = _run(own_platform, "reuse-enc", texts[:60], tenant="t-model", **fixed)
    assert reused == 0 and _run(own_platform, "reuse-enc", texts[:60], tenant="t-model", **fixed)[1] == 60
    registry.add("reuse-enc", str(make_tiny_encoder(tmp_path / "other-weights", seed=1)), task="embed")
    got, reused = _run(own_platform, "reuse-enc", texts[:60], tenant="t-model", **fixed)
    assert reused == 0
    fresh, _ = _run(own_platform, "reuse-enc", texts[:60], tenant="t-model", reuse=False, **fixed)
    _same(got, fresh)


def test_a_half_written_entry_is_never_read(own_platform: Any, tiny_encoder: Path, texts: list[str]) -> None:
    model = str(tiny_encoder)
    rows = texts[100:140]
    first, _ = _run(own_platform, model, rows, tenant="t-crash")
    files = list(tenant_folder(_store(own_platform), "t-crash").rglob("*.parquet"))
    assert files
    for path in files:  # cut short, as a crash or a full disk would leave a file written in place
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        # a writer that died before its rename: a whole file of this space, under its temporary name
        path.with_name(f".{path.name}.tmp-1-deadbeef").write_bytes(data)
    got, reused = _run(own_platform, model, rows, tenant="t-crash")
    assert reused == 0  # neither the cut files nor the leftovers were read
    _same(got, first)
    assert _run(own_platform, model, rows, tenant="t-crash")[1] == len(rows)  # stored again, whole


def test_reuse_false_neither_reads_nor_stores(own_platform: Any, tiny_encoder: Path, texts: list[str]) -> None:
    model, rows = str(tiny_encoder), texts[150:170]
    folder = tenant_folder(_store(own_platform), "t-off")
    assert _run(own_platform, model, rows, tenant="t-off", reuse=False)[1] == 0
    assert not list(folder.rglob("*.parquet"))
    assert _run(own_platform, model, rows, tenant="t-off")[1] == 0
    assert list(folder.rglob("*.parquet"))
    assert _run(own_platform, model, rows, tenant="t-off", reuse=False)[1] == 0
    with pytest.raises(InputError, match="reuse="):
        own_platform.submit("embed", model, rows, reuse="yes")
