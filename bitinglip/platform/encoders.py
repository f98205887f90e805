"""A packed forward pass for BERT-family encoders on the CPU.

Hugging Face's ``BertModel`` runs every layer on the padded ``rows x width``
grid.  Here the dense layers (three quarters of the time) see only the real
tokens, packed end to end, and attention runs once per run of rows of equal
length (rows are sorted by length first), each on its own dense grid: no
padding, no mask, no scatter.  Query, key and value are one matrix product
instead of three.  Same weights, same arithmetic in
float32: embeddings match ``BertModel`` to about 1e-6.

``PackedEncoder.supports(model)`` says whether a model can run this way;
anything else keeps the ordinary forward pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PackedEncoder:
    """The weights of a ``BertModel`` arranged for :meth:`pool`."""

    def __init__(self, model: Any) -> None:
        import torch

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
            self.layers = []
            for layer in model.encoder.layer:
                att, out = layer.attention.self, layer.attention.output
                qkv_w = torch.cat([att.query.weight, att.key.weight, att.value.weight]).t().contiguous()
                qkv_b = torch.cat([att.query.bias, att.key.bias, att.value.bias])
                self.layers.append((
                    qkv_w, qkv_b,
                    out.dense.weight.detach().t().contiguous(), out.dense.bias.detach(),
                    (out.LayerNorm.weight.detach(), out.LayerNorm.bias.detach()),
                    layer.intermediate.dense.weight.detach().t().contiguous(), layer.intermediate.dense.bias.detach(),
                    layer.output.dense.weight.detach().t().contiguous(), layer.output.dense.bias.detach(),
                    (layer.output.LayerNorm.weight.detach(), layer.output.LayerNorm.bias.detach()),
                ))

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
        import torch.nn.functional as F

        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(lengths, kind="stable")
        if (np.diff(order) == 1).all():
            order = None  # already shortest first, as the batch planner sends them
        else:
            ids, lengths = [ids[i] for i in order], lengths[order]
        rows = len(ids)
        flat = torch.from_numpy(np.fromiter((t for r in ids for t in r), dtype=np.int64, count=int(lengths.sum())))
        ends = np.cumsum(lengths)
        positions = torch.from_numpy(np.arange(int(ends[-1])) - np.repeat(ends - lengths, lengths))
        # runs of rows of one length: attention runs on each run's dense grid,
        # with no padding, no mask and no scatter to a padded grid
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(lengths)) + 1, [rows]])
        offsets = np.concatenate([[0], ends])
        runs = [(int(offsets[a]), int(offsets[b]), int(b - a), int(lengths[a])) for a, b in zip(cuts, cuts[1:])]

        heads, head_dim = self.heads, self.head_dim
        hidden = heads * head_dim
        x = F.embedding(flat, self.word) + self.pos[positions]
        x = F.layer_norm(x, (hidden,), *self.emb_ln, self.eps)
        for qkv_w, qkv_b, o_w, o_b, ln1, i_w, i_b, f_w, f_b, ln2 in self.layers:
            qkv = torch.addmm(qkv_b, x, qkv_w)
            ctx = qkv.new_empty(x.shape[0], hidden)
            for start, stop, n, width in runs:
                q, k, v = qkv[start:stop].view(n, width, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
                ctx[start:stop].view(n, width, heads, head_dim).copy_(
                    F.scaled_dot_product_attention(q, k, v).transpose(1, 2))
            x = F.layer_norm(torch.addmm(o_b, ctx, o_w) + x, (hidden,), *ln1, self.eps)
            h = F.gelu(torch.addmm(i_b, x, i_w))
            x = F.layer_norm(torch.addmm(f_b, h, f_w) + x, (hidden,), *ln2, self.eps)

        pooled = self._pool(x, lengths, pooling)
        if order is None:
            return pooled
        restored = torch.empty_like(pooled)
        restored[torch.from_numpy(order)] = pooled
        return restored

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
