"""What the CPU can do at most, and the anchors a user would pick instead of us.

- :func:`matmul_peak`: the machine's dense matrix-product rate (float32 and
  bfloat16, ``torch.matmul`` at the model's own shapes, every core), the
  ceiling any embedding variant's FLOP/s is held against.
- :func:`model_flops`: the FLOPs of one row of a BERT-shaped encoder (the
  linear layers and attention's two products; layer norms, GELU and
  softmax are left out, so a fraction of peak is slightly flattering).
- :func:`run_onnx`, :func:`run_openvino`: the model exported once to ONNX
  (``torch.onnx.export``, dynamic batch and length) and run by ONNX Runtime
  or OpenVINO, batch 64 over rows sorted by length as ``encode`` does.
  sentence-transformers' own ``backend="onnx"`` needs ``optimum``, whose
  releases pin a transformers older than the one vLLM's CPU build runs with,
  so the benchmark drives the same runtimes directly.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from _util import cores, model_path

BATCH = 64
MAX_LENGTH = 256


def cpu_description() -> str:
    """The CPU's model name and its matrix-relevant flags, for every printed figure."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
    have = [f for f in wanted if f in flags]
    return f"{name}, {cores()} cores, flags: {' '.join(have) or 'none of ' + ' '.join(wanted)}"


def model_flops(lengths: np.ndarray, config: Any) -> np.ndarray:
    """FLOPs of each row of ``lengths`` tokens through a BERT-shaped encoder."""
    h, i, layers = int(config.hidden_size), int(config.intermediate_size), int(config.num_hidden_layers)
    n = lengths.astype(np.float64)
    linear = 2 * n * (4 * h * h + 2 * h * i)  # q, k, v, o and the two feed-forward products
    attention = 2 * 2 * n * n * h  # q @ k^T and p @ v
    return layers * (linear + attention)


def corpus_flops(texts: list[str]) -> tuple[float, float]:
    """(total FLOPs of the corpus, mean tokens per row), cut as every variant cuts."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    ids = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    return float(model_flops(lengths, AutoConfig.from_pretrained(model_path())).sum()), float(lengths.mean())


def matmul_peak(seconds_each: float = 1.0) -> dict[str, float]:
    """FLOP/s of ``torch.matmul`` at the model's shapes (4,096 token rows by the hidden and feed-forward
    widths), float32 and bfloat16, torch threads = cores: the best of repeated products."""
    import torch
    from transformers import AutoConfig

    torch.set_num_threads(cores())
    config = AutoConfig.from_pretrained(model_path())
    h, i, rows = int(config.hidden_size), int(config.intermediate_size), 4096
    shapes = [(rows, h, 3 * h), (rows, h, h), (rows, h, i), (rows, i, h)]
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        flops = spent = 0.0
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            torch.matmul(a, b)  # first call: kernels picked, memory touched
            best, deadline = float("inf"), time.perf_counter() + seconds_each
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                torch.matmul(a, b)
                best = min(best, time.perf_counter() - start)
            flops += 2.0 * m * k * n
            spent += best
        out[name] = flops / spent
    return out


def _export(path: str) -> None:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_path(), attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any, mask: Any) -> Any:
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    example = (torch.ones(4, 32, dtype=torch.long), torch.ones(4, 32, dtype=torch.long))
    rows, length = torch.export.Dim("rows", max=4096), torch.export.Dim("length", max=MAX_LENGTH)
    torch.onnx.export(Hidden(), example, path, input_names=["ids", "mask"], output_names=["hidden"],
                      dynamic_shapes={"ids": {0: rows, 1: length}, "mask": {0: rows, 1: length}}, dynamo=True)


def onnx_file() -> str:
    """The exported model, made once per machine (outside every clock)."""
    folder = os.path.join(os.path.expanduser("~"), ".cache", "bitinglip", "bench")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "all-MiniLM-L6-v2.onnx")
    if not os.path.exists(path):
        part = os.path.join(folder, f"part-{os.getpid()}.onnx")
        _export(part)
        os.replace(part, path)
    return path


def _sorted_batches(texts: list[str], run: Any) -> np.ndarray:
    """``encode``'s loop: rows sorted by length (longest first), batch 64, mean pooling, unit length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), 384), dtype=np.float32)
    for start in range(0, len(texts), BATCH):
        rows = order[start:start + BATCH]
        enc = tokenizer([texts[r] for r in rows], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        hidden = run(ids, mask)
        pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


def run_onnx(texts: list[str], warm: int) -> tuple[float, np.ndarray, dict[str, Any]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cores()
    session = ort.InferenceSession(onnx_file(), options, providers=["CPUExecutionProvider"])

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return session.run(None, {"ids": ids, "mask": mask})[0]

    _sorted_batches(texts[:warm], run)
    started = time.perf_counter()
    vectors = _sorted_batches(texts, run)
    return time.perf_counter() - started, vectors, {"onnxruntime_threads": cores()}


def run_openvino(texts: list[str], warm: int) -> tuple[float, np.ndarray, dict[str, Any]]:
    import openvino as ov

    compiled = ov.Core().compile_model(onnx_file(), "CPU", {"INFERENCE_NUM_THREADS": cores()})

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return compiled({"ids": ids, "mask": mask})[0]

    _sorted_batches(texts[:warm], run)
    started = time.perf_counter()
    vectors = _sorted_batches(texts, run)
    return time.perf_counter() - started, vectors, {"openvino_threads": cores()}
