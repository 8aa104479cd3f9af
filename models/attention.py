"""Multi-head attention with nn.MultiheadAttention's parameters, computed by F.scaled_dot_product_attention.

Same state_dict (in_proj_weight [3d, d], in_proj_bias [3d], out_proj) and the same numbers as
nn.MultiheadAttention; attention weights are computed only when `need_weights=True` (then
averaged over heads, [B, L, S], as nn.MultiheadAttention returns them).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.dropout import sparse_dropout


class MultiheadAttention(nn.Module):
    """Sequence-first attention: query [L, B, d], key/value [S, B, d] -> ([L, B, d], weights or None)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"MultiheadAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.sparse_dropout = False  # models.fuse.optimize_for_training turns it on (CPU training)
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
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, w_q, b_q))
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        dropout_p = self.dropout if self.training else 0.0
        weights: Optional[Tensor] = None
        # SDPA's CPU kernels have no dropout: with it, SDPA runs this same math, so the sparse
        # dropout is applied here to the attention weights instead.
        sparse = False
        if not torch.jit.is_scripting():  # scripted models are for inference: no sparse dropout there
            sparse = (self.sparse_dropout and dropout_p > 0.0 and q.device.type == "cpu"
                      and not torch.compiler.is_compiling())
        if need_weights or sparse:
            attn = self._scores(q, k, key_padding_mask).softmax(-1)
            if need_weights:
                weights = attn.mean(1)
            out = self._attention_dropout(attn, dropout_p, sparse) @ v
        else:
            allowed: Optional[Tensor] = None
            if key_padding_mask is not None and not _nothing_padded(key_padding_mask):
                allowed = ~key_padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, dim)
        return self.out_proj(out), weights

    def _attention_dropout(self, attn: Tensor, p: float, sparse: bool) -> Tensor:
        if not torch.jit.is_scripting():
            if sparse:
                return sparse_dropout(attn, p, self.training)
        return F.dropout(attn, p, self.training)

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


def _nothing_padded(key_padding_mask: Tensor) -> bool:
    """True when no key is padded (a batch of one image, or of equal sizes) on the CPU: SDPA without
    a mask gives bit-identical results ~10 % faster there (4.1 vs 4.5 ms per encoder attention at
    800x1066). Not checked on GPUs (the check would synchronise), nor when compiling, scripting,
    tracing or exporting to ONNX (the answer would be frozen into the graph for every later input)."""
    if torch.jit.is_scripting():
        return False
    if (key_padding_mask.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()):
        return False
    return not bool(key_padding_mask.any())
