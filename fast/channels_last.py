"""channels_last weights for the whole model, and the backbone's input converted on the way in."""
from __future__ import annotations

import torch
from torch import nn


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-D weights in channels_last, and the backbone's input converted on the way in; returns `model`."""
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        # The ResNet trunk inside models.backbone.BackboneBase; one hook even if called twice.
        if module.__class__.__name__ == "IntermediateLayerGetter" and not getattr(module, "_channels_last", False):
            module.register_forward_pre_hook(_channels_last_input)
            module._channels_last = True
    return model
