"""What every task type is: the interface (:class:`TaskType`), a loaded
model (:class:`Loaded`), a micro-batch (:class:`Batch`), and the one check
of a text row (:func:`texts_or_error`).  The built-in tasks are in
``builtin`` and ``generate_task``."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from bitinglip.errors import InputError

# DTYPES' int8: loaded in float32, then dynamically quantized on the CPU by the worker plugin
from bitinglip.platform.tasks.contract import DTYPES
from bitinglip.platform.tasks.options import choice, surrogate_at


@dataclass
class Loaded:
    """A model loaded on a worker, with what its task needs beside it."""

    model: Any
    tokenizer: Any = None
    device: str = "cpu"
    max_length: int = 512
    info: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Stop what the model runs on beside its weights (a generation
        engine's thread and KV cache); the worker plugin calls it on eviction
        and teardown."""
        engine = self.info.pop("engine", None)
        if engine is not None:
            engine.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    #: input columns the task reads beside ``id`` and the text column
    input_columns: ClassVar[tuple[str, ...]] = ()
    #: input columns that may stand in for the text column (a row has one or the other)
    text_alternatives: ClassVar[tuple[str, ...]] = ()
    #: the task runs a whole partition through an engine (:meth:`run_rows`) instead of micro-batches
    engine_driven: ClassVar[bool] = False
    #: the worker may time :meth:`predict` on made-up token ids when the model loads, to choose the token
    #: budget (``batching.calibrate_budget``): for tasks whose cost is their forward pass and whose
    #: ``predict`` has no side effects
    times_budget: ClassVar[bool] = False

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

    def check_row(self, text: Any, extra: Mapping[str, Any], row_id: Any, options: Mapping[str, Any]) -> Any:
        """The row as :meth:`predict` (or :meth:`run_rows`) takes it, or an
        :class:`InputError` naming the row; ``extra`` holds the row's values
        of :attr:`input_columns`."""
        return texts_or_error([text], [row_id])[0]

    def run_rows(self, loaded: Loaded, rows: list[Any], options: Mapping[str, Any], tick: Any
                 ) -> tuple[list[dict[str, Any] | None], list[bool], dict[int, str], dict[str, float]]:
        """For :attr:`engine_driven` tasks: outputs for ``rows`` in order,
        truncation flags, failed rows (index -> reason) and stats; ``tick(done)``
        reports progress and may raise to stop."""
        raise NotImplementedError(f"task {self.name!r} runs in micro-batches (predict)")

    @abstractmethod
    def predict(self, loaded: Loaded, batch: Batch, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One output dict per row of ``batch``, in its order."""

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def torch_dtype(name: str) -> Any:
    import torch

    return torch.float32 if name == "int8" else getattr(torch, name)


def max_length(path: str, tokenizer: Any, config: Any, st_config: dict[str, Any]) -> int:
    limits = [st_config.get("max_seq_length"), getattr(config, "max_position_embeddings", None),
              getattr(config, "n_positions", None), getattr(tokenizer, "model_max_length", None)]
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(usable) if usable else 512


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
