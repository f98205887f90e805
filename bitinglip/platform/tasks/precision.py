"""Precision and size of loaded models.

``dtype="int8"`` is dynamic quantization on the CPU: a model loads in
float32, then ``torch.ao.quantization.quantize_dynamic`` turns its
``nn.Linear`` layers into int8 weights (one scale per output channel) with
activations quantized on the fly.  Embeddings, layer norms and GPT-2's ``Conv1D`` layers stay float32.

``matmul_precision`` (the embed task's option) is the precision of the
matrix products of a float32 model, named as PyTorch names it in
``torch.set_float32_matmul_precision``: ``"highest"`` is float32 throughout;
``"medium"`` lets the products take bfloat16 inputs while everything else
(residual stream, layer norms, softmax, pooling) stays float32; ``"auto"``
is decided by each worker for its own CPU by timing both when the model
loads (:func:`calibrate_matmul`): bfloat16 products run about 2x faster on an
AMX Xeon or a Zen 4 and 1.7x slower on a Xeon whose flags list AVX512-BF16
but whose hypervisor or microcode makes it slow, so no flag decides it.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from bitinglip.errors import ModelLoadError
from bitinglip.platform.tasks.calibration import Choice, Timer, cache_key, cpu_name, fastest

# MATMUL_PRECISIONS: float32 matrix-product precisions (the contract's)
from bitinglip.platform.tasks.contract import MATMUL_PRECISIONS

log = logging.getLogger(__name__)

#: the share of a GPU's (fraction-capped) memory that resident models may
#: fill; the rest is for activations and generation caches
GPU_MODEL_SHARE = 0.75




#: tokens in the micro-batch that ``auto`` times: about a quarter of the CPU token budget, so the whole
#: calibration (a warm-up and three timed runs of each precision) takes a second or two
CALIBRATION_TOKENS = 1024
#: a float32 micro-batch faster than this is a tiny model's (a test's): its timings are noise, and two workers
#: could choose differently, so it keeps float32 untimed
MIN_TIMED_S = 0.02
#: the row lengths of that micro-batch, in tokens: sentences as corpora hold them (rows of up to
#: ``encoders.SHORT_ROW_TOKENS`` run in float32 under either precision and would only dilute the timing)
CALIBRATION_LENGTHS = (12, 16, 20, 24, 32, 48)


def calibrate_matmul(requested: str, device: str, dtype: str, model: Any, packed: Any, pooling: str,
                     cache_dir: str | None, model_id: str, timer: Timer = time.perf_counter) -> Choice:
    """``highest`` or ``medium`` for ``model`` on this worker: an explicit
    ``requested`` wins; ``auto`` times both on a micro-batch of the model's
    own shapes (:func:`bitinglip.platform.tasks.calibration.fastest`).
    ``packed``: the model's :class:`~bitinglip.platform.tasks.encoders.PackedEncoder`
    built with both layouts, or None (then torch's bfloat16 autocast is timed)."""
    if requested != "auto":
        return Choice(requested, "requested")
    if not str(device).startswith("cpu") or dtype != "float32":
        return Choice("highest", "only candidate",
                      reason="bfloat16 products are an option of float32 models on a CPU")
    if packed is not None and packed.fast is None:
        return Choice("highest", "only candidate", reason="this build of torch has no bfloat16 linear kernel")
    import numpy as np
    import torch

    vocab = int(getattr(model.config, "vocab_size", 30522))
    lengths: list[int] = []
    while sum(lengths) < CALIBRATION_TOKENS:
        lengths.append(CALIBRATION_LENGTHS[len(lengths) % len(CALIBRATION_LENGTHS)])
    lengths.sort()
    rng = np.random.default_rng(0)
    ids = [rng.integers(min(1000, vocab // 2), vocab, size=n).tolist() for n in lengths]

    def run(precision: str) -> Any:
        with torch.inference_mode():
            if packed is not None:
                layers = packed.fast if precision == "medium" else packed.exact
                return packed._encode(ids, np.asarray(lengths), pooling, layers)
            width = max(lengths)
            input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
            mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "medium"):
                hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            return (hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    def agree(out: Any, exact: Any) -> float:
        return float(torch.nn.functional.cosine_similarity(out.float(), exact.float(), dim=-1).min())

    shape = f"{'packed' if packed is not None else 'autocast'}:{pooling}:{CALIBRATION_TOKENS}"
    cache = None
    if cache_dir:
        cache = Path(cache_dir) / f"matmul-{cache_key('matmul_precision', model_id, MATMUL_PRECISIONS, shape)}.json"
    choice = fastest(run, MATMUL_PRECISIONS, "highest", agree, cache=cache, timer=timer, floor_s=MIN_TIMED_S)
    log.info("matmul precision for %s on %s: %s (%s; %s)", model_id, cpu_name(), choice.value, choice.source,
             choice.reason)
    return choice


def quantize_int8(model: Any, device: str) -> Any:
    """The model with its ``nn.Linear`` layers dynamically quantized to int8."""
    import torch

    if not str(device).startswith("cpu"):
        raise ModelLoadError("dtype int8 (dynamic quantization) runs on the CPU only; use float16 or bfloat16 "
                             "on a GPU, or submit with gpu=False")
    if not isinstance(model, torch.nn.Module):
        return model
    with warnings.catch_warnings():
        # torch deprecates torch.ao quantization in favour of torchao; it still works in torch 2.13
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # per output channel: on all-MiniLM-L6-v2 it halves the drift of one scale per tensor
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8).eval()


def _tensor_bytes(value: Any, seen: set[int]) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        try:
            storage = value.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # quantized tensors in some builds
            ptr, size = id(value), value.numel() * value.element_size()
        if ptr in seen:
            return 0  # tied weights share a storage
        seen.add(ptr)
        return int(size)
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def model_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers, counting shared storage
    once and reading int8 weights out of quantized layers' packed params."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return 0
    seen: set[int] = set()
    total = sum(_tensor_bytes(v, seen) for v in model.state_dict(keep_vars=True).values())
    return total


def estimate_bytes(weight_bytes: int, stored: str | None, target: str) -> int:
    """What weights stored in ``stored`` will take in memory as ``target``
    (int8 counts as float32: that is the peak while quantizing)."""
    size = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 4}
    return int(weight_bytes * size.get(target, 4) / size.get(stored or "float32", 4))
