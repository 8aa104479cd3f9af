"""`optimize_for_training(model)`: the faster training form of a DETR model (main.py's default),
with the plain model's parameters, state_dict and, for the same dropout draws, its loss."""
from __future__ import annotations

from torch import nn

from fast.attention import use_fast_attention
from fast.channels_last import to_channels_last
from fast.dropout import SparseDropout
from fast.folding import fold_frozen_batchnorm_for_training
from fast.fused_layers import fuse_residual_layers


def optimize_for_training(model: nn.Module, sparse_dropout: bool = True) -> nn.Module:
    """`model` changed in place: each conv -> FrozenBatchNorm2d pair runs as one NormFoldedConv2d
    (skipping two elementwise passes over the activation and their backward), the frozen layers as
    fused oneDNN calls, the attention's CPU shortcuts, channels_last. With `sparse_dropout`, dropout
    (nn.Dropout modules and the attention weights' dropout) draws the dropped positions instead of a
    mask on the CPU (fast/dropout.py): same distribution, other draws than F.dropout for the same
    seed. Parameters, buffers and state_dict keys are unchanged, so the optimiser, DDP and
    checkpoints see the original layout; with the same dropout draws (or none) the loss equals the
    plain model's up to fp32 rounding. Apply before building the optimiser or wrapping in DDP;
    deepcopy works after."""
    fold_frozen_batchnorm_for_training(model)
    fuse_residual_layers(model)  # the frozen layer1 (and evaluation under no_grad) run fused
    if sparse_dropout:
        for module in model.modules():
            if type(module) is nn.Dropout:
                module.__class__ = SparseDropout  # a subclass without state: p and inplace carry over
    use_fast_attention(model, sparse_dropout=sparse_dropout)
    return to_channels_last(model)
