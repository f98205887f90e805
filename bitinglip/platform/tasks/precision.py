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
is ``"medium"`` on a CPU that multiplies bfloat16 natively (AVX512-BF16 or
AMX-BF16, where a product runs about 2x faster) and ``"highest"`` elsewhere,
decided by each worker for its own CPU.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from bitinglip.errors import ModelLoadError

#: the share of a GPU's (fraction-capped) memory that resident models may
#: fill; the rest is for activations and generation caches
GPU_MODEL_SHARE = 0.75


#: float32 matrix-product precisions, named as ``torch.set_float32_matmul_precision`` names them
MATMUL_PRECISIONS = ("highest", "medium")
#: what a job may ask for: a precision, or ``auto`` (each worker picks for its CPU)
MATMUL_CHOICES = ("auto", *MATMUL_PRECISIONS)


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (Linux: read
    from /proc/cpuinfo; elsewhere assumed not)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def matmul_precision(requested: str, device: str, dtype: str) -> str:
    """``"highest"`` or ``"medium"`` for a model of ``dtype`` on ``device``."""
    if requested != "auto":
        return requested
    cpu = str(device).startswith("cpu")
    return "medium" if cpu and dtype == "float32" and native_bf16() else "highest"


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
