"""Does a model's checkpoint hold the weights its task needs?

Transformers fills a head that is missing from the checkpoint (a classifier
on a plain encoder) with random weights and only logs "newly initialized":
the job would then answer with noise.  A task's ``load`` refuses such a
model from the loading report (:func:`refuse_untrained`); registering a model
for ``classify`` or ``generate`` refuses it earlier, from the tensor names in
the safetensors headers, without reading any weights (:func:`missing_head`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bitinglip.errors import ModelError, UntrainedHeadError

#: what each built-in task would run at random if its weights were missing
WHAT = {"classify": "classification head", "generate": "language-model head", "embed": "encoder weights"}
#: a safetensors header is a few hundred kB even for large models; more means it is not one
_MAX_HEADER = 100 << 20


def refuse_untrained(task: str, missing: Iterable[str], where: str) -> None:
    """Raise :class:`UntrainedHeadError` when ``missing`` (the weights the
    checkpoint lacks) is not empty."""
    keys = sorted(missing)
    if not keys:
        return
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    raise UntrainedHeadError(
        f"{where} has no trained {WHAT.get(task, 'weights')} for task {task!r}: its weights lack {shown}, "
        "which would start at random, so every answer would be noise; use a model trained for this task")


def safetensors_names(files: Sequence[Path]) -> set[str]:
    """The tensor names in the headers of ``files``; no weight is read."""
    names: set[str] = set()
    for path in files:
        with open(path, "rb") as f:
            head = f.read(8)
            (size,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            if not 0 < size <= _MAX_HEADER:
                raise ModelError(f"{path.name} is not a safetensors file (header size {size})")
            try:
                header = json.loads(f.read(size))
            except ValueError as exc:
                raise ModelError(f"{path.name} is not a safetensors file: {exc}") from None
        names.update(k for k in header if k != "__metadata__")
    return names


def _auto_class(task: str) -> Any:
    import transformers

    return {"classify": transformers.AutoModelForSequenceClassification,
            "generate": transformers.AutoModelForCausalLM}.get(task)


def missing_head(task: str, folder: Path, weights: Sequence[Path]) -> list[str] | None:
    """The weights of ``task``'s head that the checkpoint files ``weights``
    lack, or None when there is nothing to check (a task without a known
    head, or an architecture transformers cannot build: the worker's load
    still checks then).

    The head is what the model has beyond its base model (``classifier.*``,
    ``score.*``, ``lm_head.*``), found by building the model on the meta
    device, which allocates nothing; a head weight tied to one the
    checkpoint holds (GPT-2's ``lm_head`` is the input embedding) is there."""
    import torch
    from transformers import AutoConfig

    auto = _auto_class(task)
    if auto is None:
        return None
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = auto.from_config(config)
    except (ValueError, KeyError, OSError):
        return None
    prefix = f"{model.base_model_prefix}."
    names = safetensors_names(weights)

    def saved(key: str) -> bool:  # a base-model checkpoint names its weights without the prefix
        return key in names or (key.startswith(prefix) and key[len(prefix):] in names)

    shared: dict[int, list[str]] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(key)
    tied = {key: keys for keys in shared.values() for key in keys}
    head = [k for k in model.state_dict() if not k.startswith(prefix)]
    return [k for k in head if not saved(k) and not any(saved(t) for t in tied.get(k, ()))]
