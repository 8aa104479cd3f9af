"""Speed-ups that keep the numbers (within fp32 rounding): BN folding for inference only,
channels_last for inference and training (main.py --channels_last).

- `fold_frozen_batchnorm(model)`: each FrozenBatchNorm2d (or eval-mode BatchNorm2d) that follows a
  convolution becomes part of that convolution (scaled weights plus a bias), and the norm becomes an Identity. The
  model's state_dict changes, so fold after loading weights and do not save or train the result.
- `to_channels_last(model)`: NHWC weights and inputs for the backbone, which oneDNN / cuDNN run faster.
Both change `model` in place and return it.
"""
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> nn.Conv2d:
    """A conv computing bn(conv(x))."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    bias = bn.bias - bn.running_mean * scale
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


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-D weights in channels_last, and the backbone's input converted on the way in; returns `model`."""
    model.to(memory_format=torch.channels_last)
    for module in model.modules():
        # The ResNet trunk inside models.backbone.BackboneBase.
        if module.__class__.__name__ == "IntermediateLayerGetter":
            module.register_forward_pre_hook(_channels_last_input)
    return model
