"""GGUF files as a model source: dequantized once into a safetensors folder.

A ``.gguf`` file (llama.cpp's format, often the only download of a small
instruct model) is read by transformers' own GGUF reader and saved as a
``save_pretrained`` folder: the tokenizer, ``config.json`` with
``architectures`` set and no GGUF ``quantization_config`` (vLLM would look
for a GGUF file), and the weights as safetensors in the dtype asked.  The
registry then copies and hashes that folder like any other, so workers verify
and load it as they would a folder added by hand.

``from_pretrained(gguf_file=...)`` would do the loading in one call but needs
``accelerate``, which BitingLip does not install: the model is built from the
GGUF's config and the dequantized tensors are loaded into it here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitinglip.errors import InputError, ModelSourceError
from bitinglip.platform.models.hf_config import normalize_config

SUFFIX = ".gguf"
#: the dtypes a conversion writes; others (int8) are applied by the worker on float32 weights
SAVED_DTYPES = ("float32", "bfloat16", "float16")
#: the model class for each task a GGUF file can serve (GGUF files carry no classification heads)
_AUTO_CLASSES = {"generate": "AutoModelForCausalLM", "embed": "AutoModel"}


def is_gguf(source: str) -> bool:
    return source.lower().endswith(SUFFIX) and "://" not in source


def convert(gguf: Path, out: Path, *, task: str, dtype: str, where: str) -> None:
    """Write the model in ``gguf`` as a safetensors folder at ``out`` (which must not exist)."""
    if task not in _AUTO_CLASSES:
        raise InputError(f"{where}: a GGUF file serves the tasks {', '.join(_AUTO_CLASSES)}, not {task!r}")
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    saved = getattr(torch, dtype if dtype in SAVED_DTYPES else "float32")
    folder, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, ImportError) as exc:  # an architecture the reader lacks, a bad file
        raise ModelSourceError(f"{where}: transformers cannot read this GGUF file: {exc}") from None
    model = getattr(transformers, _AUTO_CLASSES[task]).from_config(config, dtype=saved)
    try:
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    except (ValueError, KeyError, NotImplementedError) as exc:  # a quantization type gguf cannot dequantize
        raise ModelSourceError(f"{where}: the GGUF weights cannot be dequantized: {exc}") from None
    state = {k: torch.as_tensor(v).to(saved) for k, v in tensors.items()}
    del tensors
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    untied = _untied(model, missing, state)
    if untied or unexpected:
        raise ModelSourceError(f"{where}: the GGUF tensors do not fit {type(model).__name__}: "
                               f"missing {untied[:5]}, unexpected {list(unexpected)[:5]}")
    del state
    out.mkdir(parents=True)
    tokenizer.save_pretrained(out)
    model.eval().save_pretrained(out)
    # save_pretrained writes the class it saved; the GGUF config does not name one
    normalize_config(out, task, architecture=type(model).__name__)


def _untied(model: Any, missing: list[str], loaded: dict[str, Any]) -> list[str]:
    """The missing parameters that no loaded tensor fills through weight tying
    (an ``lm_head`` tied to the embeddings is not in a GGUF file)."""
    params = model.state_dict()
    filled = {params[k].data_ptr() for k in loaded if k in params}
    return [k for k in missing if params[k].data_ptr() not in filled]
