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
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bitinglip.errors import InputError, UnknownTaskError
from bitinglip.platform.tasks.heads import refuse_untrained
from bitinglip.platform.tasks.options import (
    INT64_MAX,
    MAX_CLASSES,
    MAX_STOP_CHARS,
    MAX_STOPS,
    choice,
    model_limits,
    real,
    strings,
    surrogate_at,
    whole,
)
from bitinglip.platform.tasks.precision import MATMUL_CHOICES, matmul_precision

#: int8: loaded in float32, then dynamically quantized on the CPU by the worker plugin
DTYPES = ("float32", "float16", "bfloat16", "int8")
#: how Embed pools token states into one vector (None, as an option: the model's own config)
POOLINGS = ("mean", "cls", "max", "lasttoken")


@dataclass
class Loaded:
    """A model loaded on a worker, with what its task needs beside it."""

    model: Any
    tokenizer: Any = None
    device: str = "cpu"
    max_length: int = 512
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """One micro-batch: the rows' texts and their token ids (if tokenized)."""

    texts: list[str]
    ids: list[list[int]]

    def tensors(self, pad_id: int, device: str, left: bool = False) -> tuple[Any, Any]:
        """Padded ``input_ids`` and ``attention_mask`` tensors."""
        import numpy as np
        import torch

        lengths = np.fromiter((len(row) for row in self.ids), dtype=np.int64, count=len(self.ids))
        width = int(lengths.max())
        columns = np.arange(width)[None, :]
        real = columns >= (width - lengths)[:, None] if left else columns < lengths[:, None]
        input_ids = np.full(real.shape, pad_id, dtype=np.int64)
        input_ids[real] = np.fromiter((t for row in self.ids for t in row), dtype=np.int64, count=int(lengths.sum()))
        mask = torch.from_numpy(real.astype(np.int64))
        return torch.from_numpy(input_ids).to(device), mask.to(device)


class TaskType(ABC):
    """Base class of task types. Subclasses set ``name`` and ``columns`` and
    implement :meth:`load` and :meth:`predict`; one without them cannot be
    instantiated, so the mistake shows where the task is registered, not in
    the middle of a job on a worker."""

    name: ClassVar[str] = ""
    columns: ClassVar[tuple[str, ...]] = ()
    #: option names that change the loaded model (the worker caches by them)
    load_options: ClassVar[tuple[str, ...]] = ("dtype",)
    #: defaults of every option the task accepts; others are refused
    defaults: ClassVar[Mapping[str, Any]] = {"dtype": "float32"}
    #: the smallest partition the automatic partitioning cuts (None: ``inputs.MIN_PARTITION_ROWS``)
    min_partition_rows: ClassVar[int | None] = None

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate options on the client, before any work starts."""
        if not isinstance(options, Mapping):
            raise InputError(f"options must be a mapping of option names to values, got {type(options).__name__}")
        unknown = sorted(map(repr, set(options) - set(self.defaults)))
        if unknown:
            raise InputError(
                f"task {self.name!r} has no option {', '.join(unknown)[:300]}; "
                f"it takes {', '.join(sorted(self.defaults)) or 'none'}"
            )
        merged = {**self.defaults, **options}
        if "dtype" in merged:
            choice("dtype", merged["dtype"], DTYPES)
        return merged

    def check_model_options(self, options: Mapping[str, Any], model_dir: str | None) -> dict[str, Any]:
        """Bounds that depend on the model (labels, vocabulary, positions), from
        ``model_dir``'s config.json once the model is resolved; ``options`` are
        those :meth:`check_options` returned."""
        return dict(options)

    @abstractmethod
    def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
        """Load the model at ``path`` onto ``device`` (once per worker and load options)."""

    def tokenize(self, loaded: Loaded, texts: list[str], options: Mapping[str, Any]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text, cut to the model's maximum, and which were cut.

        Without a tokenizer, the length of each text stands in for its tokens
        (the runner only uses them to sort and size micro-batches)."""
        if loaded.tokenizer is None:
            return [[0] * max(1, len(t) // 4) for t in texts], [False] * len(texts)
        limit = loaded.max_length
        ids = loaded.tokenizer(texts, truncation=True, max_length=limit + 1)["input_ids"]
        truncated = [len(row) > limit for row in ids]
        if any(truncated):
            keep_last = bool(loaded.tokenizer("")["input_ids"])  # e.g. BERT's [SEP]
            ids = [
                (row[: limit - 1] + row[-1:] if keep_last else row[:limit]) if cut else row
                for row, cut in zip(ids, truncated)
            ]
        return ids, truncated

    def batch_cost(self, length: int, options: Mapping[str, Any]) -> int:
        """Tokens a row of this length costs in a micro-batch."""
        return length

    @abstractmethod
    def predict(self, loaded: Loaded, batch: Batch, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One output dict per row of ``batch``, in its order."""

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def _torch_dtype(name: str) -> Any:
    import torch

    return torch.float32 if name == "int8" else getattr(torch, name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _max_length(path: str, tokenizer: Any, config: Any, st_config: dict[str, Any]) -> int:
    limits = [st_config.get("max_seq_length"), getattr(config, "max_position_embeddings", None),
              getattr(config, "n_positions", None), getattr(tokenizer, "model_max_length", None)]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 512


class Embed(TaskType):
    """Pooled sentence embeddings (the model's pooling config, else mean).

    On the CPU a float32 BERT-family model runs the packed forward pass of
    :mod:`bitinglip.platform.tasks.encoders` (no work on padding).  Option
    ``matmul_precision`` (see :mod:`bitinglip.platform.tasks.precision`): ``"auto"``
    (default) multiplies in bfloat16 where the CPU does that natively,
    ``"highest"`` keeps every product in float32.
    """

    name = "embed"
    columns = ("embedding",)
    load_options = ("dtype", "matmul_precision")
    defaults: ClassVar[Mapping[str, Any]] = {"dtype": "float32", "normalize": None, "pooling": None, "matmul_precision": "auto"}

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        merged = super().check_options(options)
        choice("pooling", merged["pooling"], (None, *POOLINGS))
        choice("normalize", merged["normalize"], (None, True, False))
        choice("matmul_precision", merged["matmul_precision"], MATMUL_CHOICES)
        return merged

    def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
        from transformers import AutoModel, AutoTokenizer

        from bitinglip.platform.tasks.encoders import PackedEncoder

        root = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, report = AutoModel.from_pretrained(path, dtype=_torch_dtype(options["dtype"]), output_loading_info=True)
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
        matmul = matmul_precision(options.get("matmul_precision", "auto"), device, options["dtype"])
        info: dict[str, Any] = {"pooling": pooling, "normalize": normalize, "matmul_precision": matmul}
        if PackedEncoder.supports(model):
            info["packed"] = PackedEncoder(model, matmul)
        return Loaded(model, tokenizer, device, _max_length(path, tokenizer, model.config, st_config), info)

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
        return [{"embedding": v} for v in vectors]


class Classify(TaskType):
    """Sequence classification: a label and its probability per row."""

    name = "classify"
    columns = ("label", "score")
    defaults: ClassVar[Mapping[str, Any]] = {"dtype": "float32", "top_k": 1}

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        merged = super().check_options(options)
        merged["top_k"] = whole("top_k", merged["top_k"], 1, MAX_CLASSES)
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
            path, dtype=_torch_dtype(options["dtype"]), output_loading_info=True)
        refuse_untrained(self.name, report["missing_keys"], f"model at {path}")
        model = model.to(device).eval()
        return Loaded(model, tokenizer, device, _max_length(path, tokenizer, model.config, {}))

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


#: fixed bounds of generation options; the model's positions may bound max_new_tokens further
MAX_NEW_TOKENS, MAX_TEMPERATURE, MAX_REPETITION_PENALTY = 4096, 100.0, 100.0


class Generate(TaskType):
    """Causal LM generation; the same seed gives the same text."""

    name = "generate"
    columns = ("text",)
    #: a prompt costs a forward pass per new token: 64 prompts still reach every worker
    min_partition_rows = 16
    defaults: ClassVar[Mapping[str, Any]] = {
        "dtype": "float32", "max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0,
        "top_k": 0, "repetition_penalty": 1.0, "stop": (), "seed": None}

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        merged = super().check_options(options)
        merged["max_new_tokens"] = whole("max_new_tokens", merged["max_new_tokens"], 1, MAX_NEW_TOKENS)
        merged["temperature"] = real("temperature", merged["temperature"], 0.0, MAX_TEMPERATURE)
        merged["top_p"] = real("top_p", merged["top_p"], 0.0, 1.0, low_open=True)
        merged["top_k"] = whole("top_k", merged["top_k"], 0, MAX_CLASSES)  # 0: no top-k cut
        merged["repetition_penalty"] = real("repetition_penalty", merged["repetition_penalty"], 0.0,
                                            MAX_REPETITION_PENALTY, low_open=True)
        if merged["seed"] is not None:
            merged["seed"] = whole("seed", merged["seed"], 0, INT64_MAX)
        merged["stop"] = strings("stop", merged["stop"], MAX_STOPS, MAX_STOP_CHARS)
        return merged

    def check_model_options(self, options: Mapping[str, Any], model_dir: str | None) -> dict[str, Any]:
        limits = model_limits(model_dir)
        if limits.vocabulary is not None:
            whole("top_k", options["top_k"], 0, limits.vocabulary)
        if limits.positions is not None:  # a prompt keeps at least its last token (see tokenize)
            whole("max_new_tokens", options["max_new_tokens"], 1, max(1, limits.positions - 1))
        return dict(options)

    def load(self, path: str, device: str, options: Mapping[str, Any]) -> Loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model, report = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(options["dtype"]),
                                                             output_loading_info=True)
        # an lm_head tied to the input embeddings is not saved and not reported missing
        refuse_untrained(self.name, report["missing_keys"], f"model at {path}")
        model = model.to(device).eval()
        return Loaded(model, tokenizer, device, _max_length(path, tokenizer, model.config, {}))

    def tokenize(self, loaded: Loaded, texts: list[str], options: Mapping[str, Any]) -> tuple[list[list[int]], list[bool]]:
        # a prompt keeps its end: that is what the continuation follows from
        limit = max(1, loaded.max_length - int(options["max_new_tokens"]))
        tok = loaded.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        # an empty prompt starts from the beginning-of-text token, as generate() would
        ids = [row or [start] for row in tok(texts)["input_ids"]]
        truncated = [len(row) > limit for row in ids]
        return [row[-limit:] if cut else row for row, cut in zip(ids, truncated)], truncated

    def batch_cost(self, length: int, options: Mapping[str, Any]) -> int:
        return length + int(options["max_new_tokens"])

    def predict(self, loaded: Loaded, batch: Batch, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        import torch

        tok = loaded.tokenizer
        input_ids, mask = batch.tensors(tok.pad_token_id, loaded.device, left=True)
        sample = float(options["temperature"]) > 0
        kwargs: dict[str, Any] = {"max_new_tokens": int(options["max_new_tokens"]), "do_sample": sample,
                                  "pad_token_id": tok.pad_token_id,
                                  "repetition_penalty": float(options["repetition_penalty"])}
        if sample:
            kwargs.update(temperature=float(options["temperature"]), top_p=float(options["top_p"]),
                          top_k=int(options["top_k"]))
        if options["seed"] is not None:
            torch.manual_seed(int(options["seed"]))
        with torch.inference_mode():
            out = loaded.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        texts = tok.batch_decode(out[:, input_ids.shape[1]:].cpu(), skip_special_tokens=True)
        results = []
        for text in texts:
            for stop in options["stop"]:
                cut = text.find(stop)
                if cut >= 0:
                    text = text[:cut]
            results.append({"text": text})
        return results


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


def texts_or_error(values: Sequence[Any], ids: Sequence[Any]) -> list[str]:
    """The rows as strings, or an :class:`InputError` naming the first bad row."""
    for value, row_id in zip(values, ids):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise InputError(f"row id={row_id!r}: the text is missing (null)")
        if not isinstance(value, str):
            raise InputError(f"row id={row_id!r}: expected text (str), got {type(value).__name__} {value!r:.60}")
        at = surrogate_at(value)
        if at is not None:  # no tokenizer, JSON encoder or Parquet file takes it
            raise InputError(f"row id={row_id!r}: the text is not valid Unicode (a lone surrogate "
                             f"{value[at]!r} at character {at})")
    return list(values)
