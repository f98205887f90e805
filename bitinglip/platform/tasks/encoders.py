"""A packed forward pass for BERT-family encoders on the CPU.

Hugging Face's ``BertModel`` runs every layer on the padded ``rows x width``
grid.  Here the dense layers (three quarters of the time) see only the real
tokens, packed end to end, and attention runs once per run of rows of equal
length (rows are sorted by length first), each on its own dense grid: no
padding, no mask, no scatter.  Query, key and value are one matrix product
instead of three.

``matmul="highest"``: the model's own float32 weights and float32
arithmetic; embeddings match ``BertModel`` to about 1e-6.

``matmul="medium"``: the matrix products take bfloat16 inputs (weights kept
a second time, in bfloat16; float32 accumulation inside oneDNN) and give
bfloat16 outputs, while the residual stream, layer norms, attention and
pooling stay float32.  On a CPU with native bfloat16 dot products
(AVX512-BF16, AMX) a product runs about 2x faster.  Mean pooling averages
the rounding noise over a row's tokens, so the shortest rows carry the most
of it; rows of up to ``SHORT_ROW_TOKENS`` tokens (under 3% of the tokens of
a typical corpus) run in float32.  On all-MiniLM-L6-v2 and 20,000 sentences
the embeddings keep a cosine above 0.9999 to float32 for every row.

``PackedEncoder.supports(model)`` says whether a model can run this way;
anything else keeps the ordinary forward pass.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np

from bitinglip.platform.tasks.precision import MATMUL_PRECISIONS
from bitinglip.platform.tasks.torch_internals import Linear, onednn_linear

#: with ``matmul="medium"``, rows of at most this many tokens still run in float32
SHORT_ROW_TOKENS = 8
#: bfloat16 products run on blocks of this many token rows (see :func:`_blocked`)
ROW_BLOCK = 4096
#: ... each padded to a multiple of this: at most 64 row counts per product
ROW_QUANTUM = 64


class _Linear:
    """``x @ weight.T + bias`` in one dtype: ``F.linear`` on the model's own
    float32 weights; in bfloat16, oneDNN's linear kernel (the one
    torch.compile's CPU backend calls), or ``F.linear`` where it is missing."""

    def __init__(self, dtype: Any, onednn: Linear | None = None) -> None:
        self.dtype, self.op = dtype, onednn

    @property
    def onednn(self) -> bool:
        return self.op is not None

    def prepare(self, weight: Any, bias: Any) -> tuple[Any, Any]:
        return weight.detach().to(self.dtype).contiguous(), bias.detach().to(self.dtype)

    def __call__(self, x: Any, weight: Any, bias: Any) -> Any:
        if self.op is not None:
            return _blocked(self.op, x.to(self.dtype), weight, bias)
        import torch.nn.functional as F

        return F.linear(x.to(self.dtype), weight, bias)


def _blocked(op: Linear, x: Any, weight: Any, bias: Any) -> Any:
    """oneDNN's linear on a bounded set of shapes: oneDNN builds and keeps
    kernels per input shape (0.3-0.6 MB each), and packed batches have any
    number of rows up to the token budget, so a worker's memory grew with
    every new row count it met.  Rows go in blocks of :data:`ROW_BLOCK`, each
    padded up to a multiple of :data:`ROW_QUANTUM` and cut back by a view."""
    import torch
    import torch.nn.functional as F

    def padded(block: Any) -> Any:
        n = block.shape[0]
        pad = -n % ROW_QUANTUM
        return op(F.pad(block, (0, 0, 0, pad)) if pad else block, weight, bias)[:n]

    if x.shape[0] <= ROW_BLOCK:  # a CPU micro-batch: one block, no copy
        return padded(x)
    return torch.cat([padded(block) for block in x.split(ROW_BLOCK)])


def _build_kernels(linear: _Linear, layer: tuple[Any, ...]) -> None:
    """Run each of a layer's four products once at every row count that
    :func:`_blocked` can send, so oneDNN builds all its kernels at load
    (about 160 MB and 2.7 s for all-MiniLM-L6-v2 on one thread) and a
    worker's memory stays flat from its first job on, whatever the input
    size (the layers share the shapes)."""
    import torch

    qkv_w, qkv_b, o_w, o_b, _, i_w, i_b, f_w, f_b, _ = layer
    with torch.inference_mode():
        for rows in range(ROW_QUANTUM, ROW_BLOCK + 1, ROW_QUANTUM):
            for weight, bias in ((qkv_w, qkv_b), (o_w, o_b), (i_w, i_b), (f_w, f_b)):
                linear(torch.zeros(rows, weight.shape[1], dtype=weight.dtype), weight, bias)


def _bf16_linear() -> _Linear:
    import torch

    op = onednn_linear()
    if op is None:
        return _Linear(torch.bfloat16)
    try:
        probe = _Linear(torch.bfloat16, onednn=op)
        w, b = probe.prepare(torch.ones(2, 3), torch.zeros(2))
        if torch.equal(probe(torch.ones(1, 3), w, b), torch.full((1, 2), 3.0, dtype=torch.bfloat16)):
            return probe
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return _Linear(torch.bfloat16)


def _layers(model: Any, linear: _Linear) -> list[tuple[Any, ...]]:
    """Per layer: fused QKV, attention output, intermediate and output
    weights and biases in ``linear``'s layout, and the two layer norms."""
    import torch

    layers = []
    prep = linear.prepare
    for layer in model.encoder.layer:
        att, out = layer.attention.self, layer.attention.output
        layers.append((
            *prep(torch.cat([att.query.weight, att.key.weight, att.value.weight]),
                  torch.cat([att.query.bias, att.key.bias, att.value.bias])),
            *prep(out.dense.weight, out.dense.bias),
            (out.LayerNorm.weight.detach(), out.LayerNorm.bias.detach()),
            *prep(layer.intermediate.dense.weight, layer.intermediate.dense.bias),
            *prep(layer.output.dense.weight, layer.output.dense.bias),
            (layer.output.LayerNorm.weight.detach(), layer.output.LayerNorm.bias.detach()),
        ))
    return layers


class PackedEncoder:
    """The weights of a ``BertModel`` arranged for :meth:`pool`."""

    def __init__(self, model: Any, matmul: str = "highest") -> None:
        import torch

        if matmul not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul precision {matmul!r}: expected one of {', '.join(MATMUL_PRECISIONS)}")
        cfg = model.config
        emb = model.embeddings
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.eps = float(cfg.layer_norm_eps)
        with torch.no_grad():
            self.word = emb.word_embeddings.weight.detach()
            # every row is one segment (type 0): fold its embedding into the positions
            self.pos = (emb.position_embeddings.weight + emb.token_type_embeddings.weight[0]).detach().contiguous()
            self.emb_ln = (emb.LayerNorm.weight.detach(), emb.LayerNorm.bias.detach())
            exact = _Linear(torch.float32)
            self.exact = (exact, _layers(model, exact))
            fast = _bf16_linear() if matmul == "medium" else None
            self.fast = (fast, _layers(model, fast)) if fast is not None else None
        if self.fast is not None and self.fast[0].onednn:
            _build_kernels(self.fast[0], self.fast[1][0])

    @property
    def layers(self) -> list[tuple[Any, ...]]:
        """The layers that most rows run through."""
        return (self.fast or self.exact)[1]

    @staticmethod
    def supports(model: Any) -> bool:
        cfg = getattr(model, "config", None)
        return (getattr(cfg, "model_type", None) == "bert"
                and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
                and getattr(cfg, "hidden_act", None) == "gelu"
                and not getattr(cfg, "is_decoder", False)
                and next(model.parameters()).dtype.is_floating_point
                and next(model.parameters()).dtype.itemsize == 4
                and next(model.parameters()).device.type == "cpu")

    def pool(self, ids: list[list[int]], pooling: str) -> Any:
        """Pooled float32 vectors, one per row of ``ids``."""
        import torch

        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(lengths, kind="stable")
        if (np.diff(order) == 1).all():
            order = None  # already shortest first, as the batch planner sends them
        else:
            ids, lengths = [ids[i] for i in order], lengths[order]
        if self.fast is None:
            pooled = self._encode(ids, lengths, pooling, self.exact)
        else:
            short = int(np.searchsorted(lengths, SHORT_ROW_TOKENS, side="right"))
            parts = [self._encode(ids[:short], lengths[:short], pooling, self.exact) if short else None,
                     self._encode(ids[short:], lengths[short:], pooling, self.fast) if short < len(ids) else None]
            pooled = torch.cat([p for p in parts if p is not None])
        if order is None:
            return pooled
        restored = torch.empty_like(pooled)
        restored[torch.from_numpy(order)] = pooled
        return restored

    def _encode(self, ids: list[list[int]], lengths: np.ndarray, pooling: str,
                kernel: tuple[_Linear, list[tuple[Any, ...]]]) -> Any:
        """Pooled vectors of rows sorted shortest first, through ``kernel``'s layers."""
        import torch
        import torch.nn.functional as F

        rows = len(ids)
        flat = torch.from_numpy(np.fromiter((t for r in ids for t in r), dtype=np.int64, count=int(lengths.sum())))
        ends = np.cumsum(lengths)
        positions = torch.from_numpy(np.arange(int(ends[-1])) - np.repeat(ends - lengths, lengths))
        # runs of rows of one length: attention runs on each run's dense grid,
        # with no padding, no mask and no scatter to a padded grid
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(lengths)) + 1, [rows]])
        offsets = np.concatenate([[0], ends])
        runs = [(int(offsets[a]), int(offsets[b]), int(b - a), int(lengths[a])) for a, b in pairwise(cuts)]

        heads, head_dim = self.heads, self.head_dim
        hidden = heads * head_dim
        linear, layers = kernel
        x = F.embedding(flat, self.word) + self.pos[positions]
        x = F.layer_norm(x, (hidden,), *self.emb_ln, self.eps)
        # x (the residual stream), attention and layer norms stay float32;
        # only the products take ``linear``'s dtype
        for qkv_w, qkv_b, o_w, o_b, ln1, i_w, i_b, f_w, f_b, ln2 in layers:
            qkv = linear(x, qkv_w, qkv_b).float()
            ctx = x.new_empty(x.shape[0], hidden)
            for start, stop, n, width in runs:
                q, k, v = qkv[start:stop].view(n, width, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
                ctx[start:stop].view(n, width, heads, head_dim).copy_(
                    F.scaled_dot_product_attention(q, k, v).transpose(1, 2))
            x = F.layer_norm(x + linear(ctx, o_w, o_b), (hidden,), *ln1, self.eps)
            h = F.gelu(linear(x, i_w, i_b))
            x = F.layer_norm(x + linear(h, f_w, f_b), (hidden,), *ln2, self.eps)
        return self._pool(x, lengths, pooling)

    @staticmethod
    def _pool(x: Any, lengths: np.ndarray, pooling: str) -> Any:
        import torch

        rows, hidden = len(lengths), x.shape[1]
        if pooling == "cls":
            starts = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
            return x[starts]
        if pooling == "lasttoken":
            return x[torch.from_numpy(np.cumsum(lengths) - 1)]
        row_of = torch.from_numpy(np.repeat(np.arange(rows), lengths))
        if pooling == "max":
            out = x.new_full((rows, hidden), float("-inf"))
            return out.index_reduce_(0, row_of, x, "amax")
        sums = x.new_zeros(rows, hidden).index_add_(0, row_of, x)
        return sums / torch.from_numpy(lengths).to(x.dtype)[:, None]
