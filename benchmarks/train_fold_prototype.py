"""Prototype (for models/backbone.py): frozen BatchNorm folded into the convolution during training.

A frozen BatchNorm after a convolution is y = conv(x, W) * s + b' with s, b' fixed. Computing
conv(x, W * s) + b' instead gives the same output and the same gradient for W (dL/dW = s * the
conv gradient in both cases), but replaces two passes over every activation (multiply, add, and
their backward) by a multiply over the small weight tensor. The parameters and buffers stay where
they are, so state_dict names, the optimiser's parameter groups and checkpoints are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _folded_conv_forward(conv: torch.nn.Conv2d, bn: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        return F.conv2d(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias, conv.stride, conv.padding,
                        conv.dilation, conv.groups)

    return forward


def fold_frozen_bn_for_training(model: torch.nn.Module) -> int:
    """In place: every Conv2d directly followed (in child order) by a FrozenBatchNorm2d computes both.

    Returns the number of folded pairs. Apply after any deepcopy: the new forwards refer to the
    modules they were made for.
    """
    folded = 0
    for module in model.modules():
        children = list(module.children())
        for conv, bn in zip(children, children[1:]):
            # By name: torchvision's FrozenBatchNorm2d or a project copy with the same buffers.
            if isinstance(conv, torch.nn.Conv2d) and type(bn).__name__ == "FrozenBatchNorm2d":
                conv.forward = _folded_conv_forward(conv, bn)
                bn.forward = torch.nn.Identity().forward
                folded += 1
    return folded
