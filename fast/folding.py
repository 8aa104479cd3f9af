"""Frozen BatchNorm folded into the convolution before it: for inference as new weights
(`fold_frozen_batchnorm`), for training as a convolution that scales its own weights at every call
(`fold_frozen_batchnorm_for_training`: same parameters, buffers and state_dict)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def _scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, b') with norm(y) = y * s + b' per channel, for a frozen (or eval-mode) BatchNorm."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    return scale, norm.bias - norm.running_mean * scale


def _fold(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A conv computing bn(conv(x)), with its own (folded) weights."""
    scale, bias = _scale_shift(bn)
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_(bias)
    fused.requires_grad_(False)
    return fused


def _conv_before(parent: nn.Module, bn_name: str) -> str | None:
    """Name of the conv that feeds `bn_name` in torchvision's ResNet naming (bnK <- convK, Sequential i <- i-1)."""
    if bn_name.startswith("bn"):
        conv_name = "conv" + bn_name[2:]
    elif bn_name.isdigit() and int(bn_name) > 0:
        conv_name = str(int(bn_name) - 1)
    else:
        return None
    return conv_name if isinstance(getattr(parent, conv_name, None), nn.Conv2d) else None


def _is_frozen_norm(module: nn.Module) -> bool:
    """FrozenBatchNorm2d, or a BatchNorm2d in eval mode with running statistics (same arithmetic)."""
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats


@torch.no_grad()
def fold_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every frozen norm (FrozenBatchNorm2d, or BatchNorm2d in eval mode as in a backbone
    trained with --backbone_weights none) that directly follows a Conv2d into it; returns `model`
    (changed in place). Call it on a model in eval mode that stays so."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_frozen_norm(child):
                continue
            conv_name = _conv_before(parent, name)
            if conv_name is None:
                continue
            setattr(parent, conv_name, _fold(getattr(parent, conv_name), child))
            setattr(parent, name, nn.Identity())
    return model


class NormFoldedConv2d(nn.Conv2d):
    """conv -> FrozenBatchNorm2d computed as one convolution, conv2d(x, W * s, b'), for training.

    Holds the replaced conv's own Parameter objects (so optimisers and state_dict see the same
    tensors under the same names) and reads the norm's buffers at every call (so loading a
    state_dict later takes effect). The norm itself stays registered where it was, as a
    `FoldedFrozenBatchNorm2d` that passes its input through.
    """

    @classmethod
    def taking_over(cls, conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> NormFoldedConv2d:
        """The conv computing norm(conv(x)); `norm` is the module registered in the model after it."""
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device="meta")
        folded.weight = conv.weight
        folded.bias = conv.bias
        # Not a submodule: its buffers keep their own state_dict names under the norm's entry.
        folded.__dict__["norm"] = norm
        return folded

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W * s, b') of the conv with its norm, from the current parameters and buffers."""
        scale, bias = _scale_shift(self.norm)
        if self.bias is not None:
            bias = bias + self.bias * scale
        # channels_last weights stay so after the scaling (the product keeps the weight's strides)
        return self.weight * scale.reshape(-1, 1, 1, 1), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded_weight_and_bias()
        if self._subsample_first(x):
            # A strided 1x1 conv sees only every stride-th pixel: taking those first gives the same
            # outputs (same products, same sums), and oneDNN's weight gradient of a stride-1 conv is
            # faster (layer2's downsample, whose input from the frozen layer1 needs no gradient).
            sh, sw = self.stride
            return F.conv2d(x[:, :, ::sh, ::sw], weight, bias, 1, 0, self.dilation, self.groups)
        return self._conv_forward(x, weight, bias)

    def _subsample_first(self, x: torch.Tensor) -> bool:
        return (self.kernel_size == (1, 1) and self.stride != (1, 1) and self.padding == (0, 0)
                and self.padding_mode == "zeros" and not x.requires_grad and self.weight.requires_grad)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose affine the preceding NormFoldedConv2d already applied: identity
    forward, same buffers (same state_dict entries)."""

    @classmethod
    def taking_over(cls, norm: FrozenBatchNorm2d) -> FoldedFrozenBatchNorm2d:
        folded = cls(norm.weight.shape[0], eps=norm.eps)
        for name, buffer in norm.named_buffers(recurse=False):
            folded._buffers[name] = buffer
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fold_frozen_batchnorm_for_training(model: nn.Module) -> nn.Module:
    """Every Conv2d -> FrozenBatchNorm2d pair becomes NormFoldedConv2d -> FoldedFrozenBatchNorm2d
    (in place; trainable BatchNorm2d and pairs already folded are left alone). Returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not FrozenBatchNorm2d:
                continue
            conv_name = _conv_before(parent, name)
            if conv_name is None or type(getattr(parent, conv_name)) is not nn.Conv2d:
                continue
            norm = FoldedFrozenBatchNorm2d.taking_over(child)
            setattr(parent, conv_name, NormFoldedConv2d.taking_over(getattr(parent, conv_name), norm))
            setattr(parent, name, norm)
    return model
