"""Task types: one small interface, three built-in implementations.

A task type says how to load a model (``load``), how to turn texts into
token ids (``tokenize``) and how to run one micro-batch (``predict``, one
output per input).  Batching, ordering, progress and output are the runner's
job, so a new task type stays short::

    class Reverse(TaskType):
        name = "reverse"
        columns = ("text",)
        def load(self, path, device, options):
            return Loaded(model=None)
        def predict(self, loaded, batch, options):
            return [{"text": t[::-1]} for t in batch.texts]

    platform.register_task(Reverse())

Task objects travel to the workers with each partition, so they must stay
small: no model in ``__init__``, heavy work in ``load``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from bitinglip.errors import InputError, UnknownTaskError
from bitinglip.platform.tasks.base import Batch, Loaded, TaskType, max_length, texts_or_error, torch_dtype
from bitinglip.platform.tasks.contract import (
    DTYPES,
    MATMUL_CHOICES,
    POOLINGS,
    ClassifyOptions,
    EmbedOptions,
    bound,
    defaults,
)
from bitinglip.platform.tasks.generate_task import Generate
from bitinglip.platform.tasks.heads import refuse_untrained
from bitinglip.platform.tasks.options import bounded_value, choice, model_limits, whole
from bitinglip.platform.tasks.precision import calibrate_matmul


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Embed(TaskType):
    """Pooled sentence embeddings (the model's pooling config, else mean).

    On the CPU a float32 BERT-family model runs the packed forward pass of
    :mod:`bitinglip.platform.tasks.encoders` (no work on padding).  Option
    ``matmul_precision`` (see :mod:`bitinglip.platform.tasks.precision`): ``"auto"``
    (default) times float32 and bfloat16 products on this worker when the model
    loads and keeps the faster one that gives the same vectors (cosine >= 0.9999),
    ``"highest"`` keeps every product in float32, ``"medium"`` takes bfloat16.
    """

    name = "embed"
    columns = ("embedding",)
    times_budget = True
    load_options = ("dtype", "matmul_precision")
    #: ``count_tokens``: each row also gets ``tokens``, how many tokens of its text the model read (an OpenAI
    #: batch's ``usage.prompt_tokens`` per line)
    defaults: ClassVar[Mapping[str, Any]] = defaults(EmbedOptions)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        merged = super().check_options(options)
        choice("pooling", merged["pooling"], (None, *POOLINGS))
        choice("normalize", merged["normalize"], (None, True, False))
        choice("matmul_precision", merged["matmul_precision"], MATMUL_CHOICES)
        choice("count_tokens", merged["count_tokens"], (True, False))
        return merged

    def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
        from transformers import AutoModel, AutoTokenizer

        from bitinglip.platform.tasks.encoders import PackedEncoder

        root = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, report = AutoModel.from_pretrained(path, dtype=torch_dtype(options["dtype"]), output_loading_info=True)
        # the pooler is not used for embeddings: checkpoints saved without it are fine
        refuse_untrained(self.name, [k for k in report["missing_keys"] if not k.startswith("pooler.")],
                         f"model at {path}")
        model = model.to(device).eval()
        pool_cfg = _read_json(root / "1_Pooling" / "config.json")
        pooling = "mean"
        for mode, key in (("cls", "pooling_mode_cls_token"), ("max", "pooling_mode_max_tokens"),
                          ("lasttoken", "pooling_mode_lasttoken"), ("mean", "pooling_mode_mean_tokens")):
            if pool_cfg.get(key):
                pooling = mode
        modules = _read_json(root / "modules.json")
        normalize = any("Normalize" in str(m.get("type", "")) for m in modules) if isinstance(modules, list) else False
        st_config = _read_json(root / "sentence_bert_config.json")
        requested = options.get("matmul_precision", "auto")
        packed = None
        if PackedEncoder.supports(model):  # with both layouts while "auto" has not chosen
            timed = requested == "auto" and str(device).startswith("cpu") and options["dtype"] == "float32"
            packed = PackedEncoder(model, "medium" if requested == "medium" or timed else "highest")
        choice = calibrate_matmul(requested, device, options["dtype"], model, packed, pooling,
                                  options.get("calibration_dir"), options.get("model_sha") or path)
        if packed is not None and choice.value == "highest":
            packed.fast = None  # the bfloat16 copy of the weights lost: not kept in memory
        info: dict[str, Any] = {"pooling": pooling, "normalize": normalize, "matmul_precision": choice.value,
                                "runtime": {"matmul_precision": choice.value,
                                            "matmul_precision_choice": choice.as_dict()}}
        if packed is not None:
            info["packed"] = packed
        return Loaded(model, tokenizer, device, max_length(path, tokenizer, model.config, st_config), info)

    def predict(self, loaded: Loaded, batch: Batch, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        import torch

        pooling = options.get("pooling") or loaded.info["pooling"]
        packed = loaded.info.get("packed")
        device_type = torch.device(loaded.device).type
        low = packed is None and loaded.info.get("matmul_precision") == "medium"
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=low):
            if packed is not None:
                pooled = packed.pool(batch.ids, pooling)
            else:
                input_ids, mask = batch.tensors(loaded.tokenizer.pad_token_id or 0, loaded.device)
                hidden = loaded.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                if pooling == "cls":
                    pooled = hidden[:, 0]
                elif pooling == "max":
                    pooled = hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
                elif pooling == "lasttoken":
                    pooled = hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]
                else:
                    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            normalize = options.get("normalize")
            if normalize if normalize is not None else loaded.info["normalize"]:
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            vectors = pooled.float().cpu().numpy()
        if options.get("count_tokens"):
            return [{"embedding": v, "tokens": len(ids)} for v, ids in zip(vectors, batch.ids)]
        return [{"embedding": v} for v in vectors]


class Classify(TaskType):
    """Sequence classification: a label and its probability per row."""

    name = "classify"
    columns = ("label", "score")
    times_budget = True
    defaults: ClassVar[Mapping[str, Any]] = defaults(ClassifyOptions)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        merged = super().check_options(options)
        merged["top_k"] = bounded_value("top_k", merged["top_k"], bound(ClassifyOptions, "top_k"), int)
        return merged

    def check_model_options(self, options: Mapping[str, Any], model_dir: str | None) -> dict[str, Any]:
        labels = model_limits(model_dir).labels
        if labels is not None:
            whole("top_k", options["top_k"], 1, labels)  # the model's labels
        return dict(options)

    def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model, report = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(options["dtype"]), output_loading_info=True)
        refuse_untrained(self.name, report["missing_keys"], f"model at {path}")
        model = model.to(device).eval()
        return Loaded(model, tokenizer, device, max_length(path, tokenizer, model.config, {}))

    def predict(self, loaded: Loaded, batch: Batch, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        import torch

        input_ids, mask = batch.tensors(loaded.tokenizer.pad_token_id or 0, loaded.device)
        with torch.inference_mode():
            logits = loaded.model(input_ids=input_ids, attention_mask=mask).logits.float()
            probs = torch.softmax(logits, dim=-1).cpu()
        k = min(int(options["top_k"]), probs.shape[-1])
        scores, indices = probs.topk(k, dim=-1)
        id2label = loaded.model.config.id2label
        out = []
        for row_scores, row_idx in zip(scores.tolist(), indices.tolist()):
            labels = [id2label.get(i, str(i)) for i in row_idx]
            item: dict[str, Any] = {"label": labels[0], "score": row_scores[0]}
            if k > 1:
                item["labels"], item["scores"] = labels, row_scores
            out.append(item)
        return out


BUILTIN_TASKS: dict[str, TaskType] = {t.name: t for t in (Embed(), Classify(), Generate())}


def get_task(name: str | TaskType, registered: Mapping[str, TaskType] | None = None) -> TaskType:
    """The task type called ``name``; raises :class:`UnknownTaskError`."""
    if isinstance(name, TaskType):
        return name
    known = {**BUILTIN_TASKS, **(registered or {})}
    if name not in known:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(known))}")
    return known[name]


def check_task_type(task: Any) -> TaskType:
    if not isinstance(task, TaskType) or not task.name or not task.columns:
        raise InputError("a task type must be a TaskType instance with a name and output columns")
    reserved = {"id", "truncated"} & set(task.columns)
    if reserved:
        raise InputError(f"task {task.name!r} may not name an output column {', '.join(sorted(reserved))}")
    return task




__all__ = ["BUILTIN_TASKS", "DTYPES", "POOLINGS", "Batch", "Classify", "Embed", "Generate", "Loaded", "TaskType",
           "check_task_type", "get_task", "max_length", "texts_or_error", "torch_dtype"]
