"""What a model must be before it is registered or loaded: a folder of
regular files (no links out of it, no FIFOs or devices), under a size cap,
copied with sane modes; and for classify/generate, weights that hold the
task's head, so a job never answers with a randomly initialised one."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from model_helpers import copy_model, lay_out_hub_cache

from bitinglip.errors import ModelError, ModelTooLargeError, UnsafeModelFileError, UntrainedHeadError
from bitinglip.platform.models import integrity
from bitinglip.platform.models.access_log import log_path
from bitinglip.platform.models.registry import Registry
from bitinglip.platform.tasks import heads
from bitinglip.platform.tasks.builtin import get_task
from bitinglip.settings import Settings

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
#: small enough that a regression which reads through a link stops here, not at a full disk
CAP = 64 << 20


def _nothing_copied(settings: Settings, name: str) -> None:
    assert Registry(settings).versions(name) == []
    cache = Path(settings.model_cache_dir)
    log = log_path(settings)
    copied = [p for p in cache.rglob("*") if p != log and not p.is_dir()] if cache.exists() else []
    assert copied == [], f"refused, yet files were copied: {copied}"


@pytest.fixture
def capped(settings: Settings) -> Settings:
    return settings.with_(model_max_bytes=CAP)


def test_a_link_to_etc_is_refused_and_nothing_is_copied(tmp_path: Path, capped: Settings,
                                                        tiny_encoder: Path) -> None:
    model = copy_model(tiny_encoder, tmp_path / "with-etc")
    os.symlink("/etc", model / "etc")
    with pytest.raises(UnsafeModelFileError, match="'etc' is a symbolic link") as refused:
        Registry(capped).add("etc", str(model), task="embed")
    assert "/etc" in str(refused.value)
    _nothing_copied(capped, "etc")
    # a link to one file is refused the same way
    os.unlink(model / "etc")
    os.symlink("/etc/passwd", model / "vocab-extra.txt")
    with pytest.raises(UnsafeModelFileError, match="'vocab-extra.txt' is a symbolic link"):
        Registry(capped).add("etc", str(model), task="embed")
    _nothing_copied(capped, "etc")


@pytest.mark.timeout(60)  # "refused quickly": the scan never opens the link
def test_a_link_to_dev_zero_is_refused_before_reading(tmp_path: Path, capped: Settings, tiny_encoder: Path) -> None:
    model = copy_model(tiny_encoder, tmp_path / "with-zero")
    os.symlink("/dev/zero", model / "model-00002.safetensors")
    # the old code read /dev/zero until the disk was full; CAP bounds a regression to 64 MiB
    with pytest.raises(UnsafeModelFileError, match="'model-00002.safetensors' is a symbolic link"):
        Registry(capped).add("zero", str(model), task="embed")
    _nothing_copied(capped, "zero")


@pytest.mark.timeout(60)  # the old code blocked forever opening the FIFO
def test_a_fifo_is_refused(tmp_path: Path, capped: Settings, tiny_encoder: Path) -> None:
    model = copy_model(tiny_encoder, tmp_path / "with-fifo")
    os.mkfifo(model / "merges.txt")
    with pytest.raises(UnsafeModelFileError, match="'merges.txt' is a FIFO"):
        Registry(capped).add("fifo", str(model), task="embed")
    _nothing_copied(capped, "fifo")


def test_an_over_size_model_is_refused_before_copying(settings: Settings, tiny_encoder: Path) -> None:
    size = sum(p.stat().st_size for p in tiny_encoder.rglob("*") if p.is_file())
    small = settings.with_(model_max_bytes=size // 2)
    with pytest.raises(ModelTooLargeError, match=f"more than {size // 2} bytes") as refused:
        Registry(small).add("big", str(tiny_encoder), task="embed")
    assert "BITINGLIP_MODEL_MAX_BYTES" in str(refused.value) and isinstance(refused.value, ModelError)
    _nothing_copied(small, "big")
    # the cap at the model's exact size still lets it in
    assert Registry(settings.with_(model_max_bytes=size)).add("big", str(tiny_encoder), task="embed").version == "1"


def test_a_file_that_grows_while_copied_stops_at_the_cap(tmp_path: Path) -> None:
    src = tmp_path / "growing.bin"
    src.write_bytes(b"x" * 1000)  # measured at 1000 bytes, then it grew
    with pytest.raises(ModelTooLargeError, match="grew past the size cap"):
        integrity.copy_hashed(src, tmp_path / "copy.bin", limit=999)
    assert (tmp_path / "copy.bin").stat().st_size <= 999


def test_a_folder_swapped_for_a_link_after_the_scan_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "swap"
    (model / "etc").mkdir(parents=True)
    (model / "etc" / "hostname").write_text("a harmless file")
    [scanned] = integrity.scan_source(model, max_bytes=CAP, where="test")
    os.rename(model / "etc", tmp_path / "moved")
    os.symlink("/etc", model / "etc")  # the same path now reads /etc/hostname
    with pytest.raises(UnsafeModelFileError, match="no longer the file that was checked"):
        integrity.copy_hashed(scanned.path, tmp_path / "copy", CAP, "test", scanned.identity)


def test_the_cap_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).model_max_bytes == 64 << 30
    assert Settings.from_env({"BITINGLIP_MODEL_MAX_BYTES": "1000"}).model_max_bytes == 1000


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_copies_get_sane_modes_whatever_the_source_had(tmp_path: Path, settings: Settings, tiny_encoder: Path,
                                                       no_umask: None) -> None:
    model = copy_model(tiny_encoder, tmp_path / "modes")
    (model / "sub").mkdir()
    (model / "sub" / "notes.txt").write_text("hello")
    os.chmod(model / "sub", 0o777)
    os.chmod(model / "sub" / "notes.txt", 0o6777)  # setuid, setgid, executable, writable by all
    os.chmod(model / "config.json", 0o777)
    manifest = Registry(settings).add("modes", str(model), task="embed")
    version = Path(settings.model_cache_dir) / "modes" / manifest.version
    for path in [version, *version.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (integrity.DIR_MODE if path.is_dir() else integrity.FILE_MODE), (path, oct(mode))


def test_hub_links_are_followed_inside_the_repository_only(tmp_path: Path, settings: Settings,
                                                           tiny_classifier: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = lay_out_hub_cache(hub, "acme/tiny-clf", COMMIT, tiny_classifier)
    offline = settings.with_(hf_cache_dir=hub, hf_offline=True)
    manifest = Registry(offline).add("clf", f"hf://acme/tiny-clf@{COMMIT}", task="classify")
    copied = Path(settings.model_cache_dir) / "clf" / "1" / "model.safetensors"
    assert not copied.is_symlink() and copied.read_bytes() == (tiny_classifier / "model.safetensors").read_bytes()
    assert manifest.files["model.safetensors"]["size"] == copied.stat().st_size
    # a link that leaves the repository's cache folder is refused, even in a snapshot
    os.symlink("/etc/hostname", snapshot / "hostname.txt")
    with pytest.raises(UnsafeModelFileError, match="'hostname.txt' is a symbolic link.*outside the hub"):
        Registry(offline).add("clf", f"hf://acme/tiny-clf@{COMMIT}", task="classify")
    os.unlink(snapshot / "hostname.txt")
    # ... and so is one into another repository of the same hub cache
    other = lay_out_hub_cache(hub, "acme/other", COMMIT, tiny_classifier)
    os.symlink(os.path.relpath(other / "config.json", snapshot), snapshot / "other.json")
    with pytest.raises(UnsafeModelFileError, match="'other.json'"):
        Registry(offline).add("clf", f"hf://acme/tiny-clf@{COMMIT}", task="classify")
    assert Registry(offline).versions("clf") == ["1"]


def test_a_packaged_model_is_held_to_the_same_rules(tmp_path: Path, capped: Settings, tiny_encoder: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    model = copy_model(tiny_encoder, site / "fake_model_pkg" / "model")
    (site / "fake_model_pkg" / "__init__.py").write_text(f"MODEL_DIR = {str(model)!r}\n")
    info = site / "fake_model_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-model-pkg\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("fake_model_pkg\n")
    monkeypatch.syspath_prepend(str(site))
    os.symlink("/etc/passwd", model / "passwd.txt")
    with pytest.raises(UnsafeModelFileError, match="'passwd.txt' is a symbolic link"):
        Registry(capped).add("pkg", "pkg://fake-model-pkg", task="embed")
    os.unlink(model / "passwd.txt")
    assert Registry(capped).add("pkg", "pkg://fake-model-pkg", task="embed").revision == "1.0"


def test_a_link_planted_in_a_registered_version_fails_verification(registry: Registry, tiny_encoder: Path) -> None:
    from bitinglip.errors import IntegrityError

    registry.add("enc", str(tiny_encoder), task="embed")
    weights = registry.root / "enc" / "1" / "model.safetensors"
    os.unlink(weights)
    os.symlink("/dev/zero", weights)
    with pytest.raises(IntegrityError, match="'model.safetensors' is no longer a regular file"):
        registry.verify("enc")


# --- 13.5: a task head that would start at random is refused

HEADLESS = "has no trained classification head for task 'classify'"


@pytest.mark.parametrize("error", [UnsafeModelFileError, ModelTooLargeError, UntrainedHeadError])
def test_model_errors_are_a_422_over_rest(error: type[ModelError]) -> None:
    from bitinglip.gateway.handlers import status_of

    assert status_of(error("refused")) == 422


def test_classify_load_refuses_an_encoder_without_a_head(tiny_encoder: Path, tiny_classifier: Path) -> None:
    classify = get_task("classify")
    with pytest.raises(UntrainedHeadError, match=HEADLESS) as refused:
        classify.load(str(tiny_encoder), "cpu", classify.check_options({}))
    assert "classifier.weight" in str(refused.value) and isinstance(refused.value, ModelError)
    loaded = classify.load(str(tiny_classifier), "cpu", classify.check_options({}))
    assert loaded.model.config.id2label[2] == "positive"


def _untied_gpt2_without_lm_head(tiny_gpt2: Path, path: Path) -> Path:
    import transformers

    model = copy_model(tiny_gpt2, path)
    config = transformers.GPT2Config.from_pretrained(model, tie_word_embeddings=False)
    transformers.GPT2Model(config).save_pretrained(model)  # the base model alone: no lm_head
    return model


def test_generate_refuses_a_missing_lm_head_but_takes_a_tied_one(tmp_path: Path, tiny_gpt2: Path) -> None:
    generate = get_task("generate")
    options = generate.check_options({})
    with generate.load(str(tiny_gpt2), "cpu", options) as loaded:  # closed: its engine's thread would outlive pytest
        assert loaded.model.config.tie_word_embeddings  # tied: not saved, fine
    headless = _untied_gpt2_without_lm_head(tiny_gpt2, tmp_path / "gpt2-headless")
    with pytest.raises(UntrainedHeadError, match="no trained language-model head.*lm_head.weight"):
        generate.load(str(headless), "cpu", options)


def test_registering_for_generate_checks_the_lm_head(tmp_path: Path, registry: Registry, tiny_gpt2: Path) -> None:
    assert registry.add("gpt", str(tiny_gpt2), task="generate").version == "1"  # its lm_head is tied
    headless = _untied_gpt2_without_lm_head(tiny_gpt2, tmp_path / "gpt2-headless")
    with pytest.raises(UntrainedHeadError, match="no trained language-model head.*lm_head.weight"):
        registry.add("headless", str(headless), task="generate")
    assert registry.versions("headless") == []


def test_embed_takes_an_encoder_saved_without_its_pooler(tmp_path: Path, tiny_encoder: Path) -> None:
    import transformers

    model = copy_model(tiny_encoder, tmp_path / "no-pooler")
    config = transformers.BertConfig.from_pretrained(model)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(model)
    embed = get_task("embed")
    assert embed.load(str(model), "cpu", embed.check_options({})).model is not None


def test_registering_a_headless_model_for_classify_is_refused(registry: Registry, settings: Settings,
                                                              tiny_encoder: Path, tiny_classifier: Path) -> None:
    with pytest.raises(UntrainedHeadError, match=HEADLESS):
        registry.add("enc", str(tiny_encoder), task="classify")
    _nothing_copied(settings, "enc")
    assert registry.add("enc", str(tiny_encoder), task="embed").version == "1"
    assert registry.add("clf", str(tiny_classifier), task="classify").version == "1"


def test_the_registration_check_reads_headers_not_weights(tmp_path: Path, tiny_classifier: Path,
                                                          tiny_encoder: Path) -> None:
    model = copy_model(tiny_classifier, tmp_path / "header-only")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8 + int.from_bytes(data[:8], "little")])  # the tensors' data cut off: names only
    assert heads.missing_head("classify", model, [weights]) == []
    missing = heads.missing_head("classify", tiny_encoder, [tiny_encoder / "model.safetensors"])
    assert sorted(missing or []) == ["classifier.bias", "classifier.weight"]
    assert heads.missing_head("embed", tiny_encoder, [tiny_encoder / "model.safetensors"]) is None


def test_models_add_cli_refuses_a_headless_classifier(tmp_path: Path, tiny_encoder: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from bitinglip.cli import main
    from bitinglip.settings import get_settings

    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        assert main(["models", "add", "enc", str(tiny_encoder), "--task", "classify"]) == 1
    finally:
        get_settings.cache_clear()
    assert HEADLESS in capsys.readouterr().err


def test_a_classify_job_on_a_headless_model_fails_once_with_the_reason(platform: Any, tiny_encoder: Path,
                                                                       tiny_classifier: Path) -> None:
    texts = [f"row {i}" for i in range(40)]
    # retries would not help: the error comes straight back, not after three more loads
    job = platform.submit("classify", model=str(tiny_encoder), inputs=texts, partition_rows=10, retries=3)
    with pytest.raises(UntrainedHeadError, match=HEADLESS):
        job.result()
    assert job.status() == "failed"
    # the workers are still there and serve the next job
    assert len(platform.submit("classify", model=str(tiny_classifier), inputs=texts).result()) == 40
