"""Registering what users hold (issue 23): config fixes engines need, GGUF
files refused before any conversion where they are unsafe or too big, and
a model load failure that pickles as one line.  The real GGUF conversion and
a job on it: tests/models/test_gguf_model.py."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import ClassVar

import pytest
import tblib.pickling_support

from bitinglip.errors import ModelSourceError, ModelTooLargeError, UnsafeModelFileError
from bitinglip.platform.models.registry import Registry
from bitinglip.settings import Settings
from tests.tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


def _as_saved_from_gguf(src: Path, dst: Path) -> Path:
    """``src`` as transformers saves a model dequantized from a GGUF file: no architectures, and the
    GGUF quantization_config kept."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config.pop("architectures", None)
    config["quantization_config"] = {"quant_method": "gguf"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_a_folder_without_architectures_is_registered_with_them(registry: Registry, llama: Path,
                                                                tmp_path: Path) -> None:
    src = _as_saved_from_gguf(llama, tmp_path / "saved")
    manifest = registry.add("fixed", str(src), task="generate")
    path, _ = registry.locate("fixed")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # from model_type 'llama', for generation
    assert "quantization_config" not in config
    assert registry.verify("fixed").sha256 == manifest.sha256  # the manifest hashes the fixed config
    assert json.loads((src / "config.json").read_text()).get("quantization_config")  # the source is untouched
    add = [e for e in registry.access.read() if e["event"] == "add"][-1]
    assert len(add["config_fixes"]) == 2


def test_vllm_names_the_real_cause(llama: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from transformers import AutoConfig

    from bitinglip.platform.tasks.engines.vllm_engine import vllm_refuses

    src = _as_saved_from_gguf(llama, tmp_path / "saved")
    why = vllm_refuses(AutoConfig.from_pretrained(src), "cpu")
    assert why is not None and "names no architectures" in why and "'llama'" in why
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    why = vllm_refuses(AutoConfig.from_pretrained(src), "cpu")
    assert why is not None and "GGUF quantization_config" in why
    assert vllm_refuses(AutoConfig.from_pretrained(llama), "cpu") is None


def test_a_gguf_link_a_big_file_and_a_bad_file_are_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    real = tmp_path / "model.gguf"
    real.write_bytes(b"GGUF" + b"\0" * 4096)
    link = tmp_path / "link.gguf"
    link.symlink_to(real)
    with pytest.raises(UnsafeModelFileError, match="symbolic link"):
        Registry(Settings(model_cache_dir=cache)).add("g", str(link), task="generate")
    with pytest.raises(ModelTooLargeError, match="BITINGLIP_MODEL_MAX_BYTES"):
        Registry(Settings(model_cache_dir=cache, model_max_bytes=1024)).add("g", str(real), task="generate")
    with pytest.raises(ModelSourceError, match="no such file"):
        Registry(Settings(model_cache_dir=cache)).add("g", str(tmp_path / "none.gguf"), task="generate")
    with pytest.raises(ModelSourceError, match="cannot read this GGUF file"):
        Registry(Settings(model_cache_dir=cache)).add("g", str(real), task="generate")
    # nothing is left behind: no version, no conversion folder
    assert not (cache / "g").exists() and not os.listdir(cache / ".bitinglip" / "tmp")


def test_a_load_failure_pickles_as_one_line_without_its_cause(tmp_path: Path) -> None:
    """vLLM's config errors are pydantic ValidationErrors whose input is an ArgsKwargs, which does not
    pickle; Dask pickles an error's whole chain (tblib), so the cause must not travel with ours."""
    pytest.importorskip("vllm")
    from bitinglip.errors import ModelLoadError
    from bitinglip.platform.plugins.model_plugin import ModelPlugin

    class Failing:
        name = "generate"
        load_options = ()
        defaults: ClassVar[dict[str, str]] = {}

        def load(self, path: str, *args: object) -> None:
            from vllm.config import ModelConfig

            ModelConfig(model=path, quantization="bogus")  # raises the ValidationError vLLM raises

    plugin = ModelPlugin(settings=Settings(model_cache_dir=tmp_path / "cache"))
    model = make_tiny_llama(tmp_path / "m")
    with pytest.raises(ModelLoadError) as caught:
        plugin.get(Failing(), str(model), {})  # type: ignore[arg-type]
    err = caught.value
    assert err.__cause__ is None and err.__context__ is None
    assert "\n" not in str(err) and "ValidationError" in str(err) and "ArgsKwargs" not in str(err)
    tblib.pickling_support.install(err)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
