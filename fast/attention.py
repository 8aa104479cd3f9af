"""models.attention.MultiheadAttention with two CPU shortcuts, swapped in by the optimize_* entry points.

- Dropout on the attention weights drawn by `sparse_dropout` (CPU training, `sparse_dropout=True`):
  SDPA's CPU kernels have no dropout of their own (with it, SDPA runs the explicit math), so the
  scores are computed here and their softmax dropped by the position-drawing dropout.
- No key padded (a batch of one image, or of equal sizes): SDPA without a mask, which gives the same
  numbers on the CPU and is quicker. Not checked on GPUs (the check would synchronise), nor when
  compiling, tracing or exporting to ONNX (the answer would be frozen into the graph for every later
  input).
Same parameters, state_dict and forward contract as the plain module.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fast.dropout import sparse_dropout
from models.attention import MultiheadAttention


class FastMultiheadAttention(MultiheadAttention):
    """The plain attention plus the CPU shortcuts above; `sparse_dropout` turns the dropout one on."""

    sparse_dropout: bool = False

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        dropout_p = self.dropout if self.training else 0.0
        if (self.sparse_dropout and dropout_p > 0.0 and query.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            length, batch, dim = query.shape
            q, k, v = self._project(query, key, value)
            attn = self._scores(q, k, key_padding_mask).softmax(-1)
            weights = attn.mean(1) if need_weights else None
            return self._merge_heads(sparse_dropout(attn, dropout_p) @ v, length, batch, dim), weights
        if not need_weights and key_padding_mask is not None and _nothing_padded(key_padding_mask):
            key_padding_mask = None
        return super().forward(query, key, value, key_padding_mask, need_weights)


def _nothing_padded(key_padding_mask: Tensor) -> bool:
    """True when no key is padded, checked only where the answer may steer this one call (eager, CPU)."""
    if (key_padding_mask.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()):
        return False
    return not bool(key_padding_mask.any())


def use_fast_attention(model: nn.Module, sparse_dropout: bool = False) -> nn.Module:
    """Every MultiheadAttention of `model` becomes a FastMultiheadAttention (in place: same modules
    and state, another forward), with the sparse attention dropout on or off. Returns `model`."""
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module.__class__ = FastMultiheadAttention
            module.sparse_dropout = sparse_dropout
    return model
