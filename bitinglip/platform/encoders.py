"""A packed forward pass for BERT-family encoders on the CPU.

Hugging Face's ``BertModel`` runs every layer on the padded ``rows x width``
grid.  Here the dense layers (three quarters of the time) see only the real
tokens, packed end to end; only attention looks at the padded grid, and a
micro-batch whose rows all have the same length (common once rows are sorted
by length) skips the padding and the mask altogether.  Query, key and value
are one matrix product instead of three.  Same weights, same arithmetic in
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
        rows, width = len(ids), int(lengths.max())
        flat = torch.from_numpy(np.fromiter((t for r in ids for t in r), dtype=np.int64, count=int(lengths.sum())))
        grid = np.arange(width)[None, :] < lengths[:, None]  # rows x width, True on real tokens
        positions = torch.from_numpy(np.nonzero(grid)[1])
        ragged = bool((lengths != width).any())
        slots = torch.from_numpy(np.flatnonzero(grid)) if ragged else None
        key_mask = torch.from_numpy(grid[:, None, None, :]) if ragged else None

        hidden = self.heads * self.head_dim
        x = F.embedding(flat, self.word) + self.pos[positions]
        x = F.layer_norm(x, (hidden,), *self.emb_ln, self.eps)
        for qkv_w, qkv_b, o_w, o_b, ln1, i_w, i_b, f_w, f_b, ln2 in self.layers:
            qkv = torch.addmm(qkv_b, x, qkv_w)
            if ragged:
                padded = qkv.new_zeros(rows * width, 3 * hidden)
                padded[slots] = qkv
                qkv = padded
            q, k, v = qkv.view(rows, width, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
            ctx = ctx.transpose(1, 2).reshape(rows * width, hidden)
            if ragged:
                ctx = ctx[slots]
            x = F.layer_norm(torch.addmm(o_b, ctx, o_w) + x, (hidden,), *ln1, self.eps)
            h = F.gelu(torch.addmm(i_b, x, i_w))
            x = F.layer_norm(torch.addmm(f_b, h, f_w) + x, (hidden,), *ln2, self.eps)

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
