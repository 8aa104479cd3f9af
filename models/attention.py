"""Multi-head attention with nn.MultiheadAttention's parameters, computed by F.scaled_dot_product_attention.

Same state_dict (in_proj_weight [3d, d], in_proj_bias [3d], out_proj) and the same numbers as
nn.MultiheadAttention; attention weights are computed only when `need_weights=True` (then
averaged over heads, [B, L, S], as nn.MultiheadAttention returns them).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiheadAttention(nn.Module):
    """Sequence-first attention: query [L, B, d], key/value [S, B, d] -> ([L, B, d], weights or None)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"MultiheadAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """key_padding_mask [B, S] bool, True = ignore that key."""
        length, batch, dim = query.shape
        q, k, v = self._project(query, key, value)
        dropout_p = self.dropout if self.training else 0.0
        weights: Optional[Tensor] = None
        if need_weights:
            attn = self._scores(q, k, key_padding_mask).softmax(-1)
            weights = attn.mean(1)
            out = F.dropout(attn, dropout_p, self.training) @ v
        else:
            allowed: Optional[Tensor] = None
            if key_padding_mask is not None:
                allowed = ~key_padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        return self._merge_heads(out, length, batch, dim), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The input projections, split into heads: q [B, heads, L, d/heads], k and v [B, heads, S, d/heads]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return (self._heads(F.linear(query, w_q, b_q)), self._heads(F.linear(key, w_k, b_k)),
                self._heads(F.linear(value, w_v, b_v)))

    def _merge_heads(self, out: Tensor, length: int, batch: int, dim: int) -> Tensor:
        """[B, heads, L, d/heads] -> the output projection of [L, B, d]."""
        return self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, dim))

    def _scores(self, q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        """q k^T / sqrt(d_head), -inf at padded keys: [B, heads, L, S]. The padding enters as the
        matmul's added bias (baddbmm), so no masked copy of the scores is made, nor one of their grad."""
        batch, heads, length, head_dim = q.shape
        q3 = q.reshape(batch * heads, length, head_dim)
        k3 = k.reshape(batch * heads, k.shape[2], head_dim).transpose(1, 2)
        if key_padding_mask is None:
            scores = torch.bmm(q3 * head_dim ** -0.5, k3)
        else:
            bias = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill_(key_padding_mask, float("-inf"))[:, None, None, :]
            bias = bias.expand(batch, heads, 1, k3.shape[2]).reshape(batch * heads, 1, k3.shape[2])
            scores = torch.baddbmm(bias, q3, k3, alpha=head_dim ** -0.5)
        return scores.view(batch, heads, length, -1)

    def _heads(self, x: Tensor) -> Tensor:
        """[N, B, d] -> [B, heads, N, d/heads]."""
        n, b, d = x.shape
        return x.reshape(n, b, self.num_heads, d // self.num_heads).permute(1, 2, 0, 3)
