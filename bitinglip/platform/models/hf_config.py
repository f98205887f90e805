"""Fixes to a model folder's ``config.json`` that engines need and savers leave out.

- ``architectures``: vLLM picks its implementation by it alone; a folder saved
  from a model built with ``from_config`` (a GGUF conversion, some exports)
  lacks it, and vLLM then says it has no implementation.  It is filled from
  ``model_type`` where transformers maps that type for the task.
- a ``quantization_config`` of ``quant_method: gguf`` next to safetensors
  weights: the weights were dequantized, and vLLM would look for a GGUF file
  ("Unknown quantization method: gguf").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: transformers' auto mapping (model_type -> class name) that names a task's model class
_MAPPINGS = {"generate": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
             "classify": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
             "embed": "MODEL_MAPPING_NAMES"}


def architecture_for(model_type: Any, task: str) -> str | None:
    """The class transformers uses for ``model_type`` and ``task`` (None: it maps none)."""
    if not isinstance(model_type, str) or task not in _MAPPINGS:
        return None
    from transformers.models.auto import modeling_auto

    found = getattr(modeling_auto, _MAPPINGS[task]).get(model_type)
    return found if isinstance(found, str) else None


def normalize_config(folder: Path, task: str, architecture: str | None = None) -> list[str]:
    """Fix ``folder/config.json`` in place; returns what changed (empty: nothing)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # no config or not JSON: the task's own load says what is wrong
    if not isinstance(config, dict):
        return []
    changed = []
    if not config.get("architectures"):
        name = architecture or architecture_for(config.get("model_type"), task)
        if name is not None:
            config["architectures"] = [name]
            changed.append(f"architectures set to [{name!r}] from model_type {config.get('model_type')!r}")
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf" and not any(folder.glob("*.gguf")):
        del config["quantization_config"]
        changed.append("the GGUF quantization_config of dequantized weights dropped")
    if changed:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config, indent=2))
    return changed
