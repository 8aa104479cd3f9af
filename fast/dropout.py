"""Dropout that draws which elements it drops instead of a mask (the CPU training fast path).

torch's CPU dropout draws one Bernoulli number per element from a serial Mersenne twister, which
makes it a large part of a DETR training step on the CPU; with dropout, attention also leaves
SDPA's fused CPU kernel for its math path, dominated by drawing that mask. In an i.i.d.
Bernoulli(p) sequence the gaps between dropped elements are i.i.d. Geometric(p), so drawing those
gaps (about p * n numbers) and summing them up gives the dropped positions with exactly the same
distribution: 1/p times fewer draws. The int64 positions (8p bytes per element) are what backward
keeps. Kept elements are scaled by 1 / (1 - p), as F.dropout does.

The draws come from torch's generator (torch.manual_seed makes them reproducible) but differ from
F.dropout's for the same seed. Tensors off the CPU go to F.dropout, whose fused kernels are fast,
and so does dropout inside torch.compile.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SPARE_DEVIATIONS = 8.0  # first draw: the expected count plus this many standard deviations


def dropped_positions(numel: int, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sorted int64 indices in [0, numel), each present independently with probability p."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropped_positions: p must be in (0, 1), got {p}")
    mean = numel * p
    count = max(16, int(mean + SPARE_DEVIATIONS * math.sqrt(mean * (1.0 - p)) + 16))  # if short, draw on
    parts, end = [], 0
    while end < numel:
        gaps = torch.empty(count, dtype=torch.int64).geometric_(p, generator=generator)  # values >= 1
        positions = torch.cumsum(gaps, 0).add_(end - 1)
        parts.append(positions)
        end = int(positions[-1]) + 1
        count = int((numel - end) * p * 2) + 16
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, numel))]


class _SparseDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        dropped = dropped_positions(x.numel(), p)
        out = torch.mul(x, 1.0 / (1.0 - p)).contiguous()  # positions index the row-major order
        out.view(-1).index_fill_(0, dropped, 0.0)
        ctx.save_for_backward(dropped)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dropped,) = ctx.saved_tensors
        grad_in = torch.mul(grad, 1.0 / (1.0 - ctx.p)).contiguous()
        grad_in.view(-1).index_fill_(0, dropped, 0.0)
        return grad_in, None


def sparse_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the dropped elements drawn as positions (CPU); same distribution."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or x.numel() == 0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training)  # compiled graphs: no data-dependent draw loop to break them
    return _SparseDropout.apply(x, p)


class SparseDropout(nn.Dropout):
    """nn.Dropout computed by `sparse_dropout` (same p, no parameters or buffers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return sparse_dropout(x, self.p, self.training)
