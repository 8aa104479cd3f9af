"""ResNet stem and layers run as fused oneDNN calls (convolution + ReLU + residual addition), the
ops inductor's CPU freezing emits, for CPU fp32 where no autograd graph is needed: inference, and
the frozen layer1 when training. Large outputs go to buffers kept from call to call (fast/scratch.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fast.folding import FoldedFrozenBatchNorm2d, NormFoldedConv2d
from fast.scratch import ALWAYS_MAPPED_BYTES, ScratchBuffers
from fast.winograd import WinogradConv2d


def fuse_stem(model: nn.Module) -> nn.Module:
    """In every ResNet trunk (conv1, bn1 folded away, relu, maxpool), conv1 becomes a `StemConv2d`
    computing the ReLU too (relu becomes an Identity). Returns `model`."""
    for trunk in model.modules():
        if (type(getattr(trunk, "conv1", None)) is nn.Conv2d and isinstance(getattr(trunk, "bn1", None), nn.Identity)
                and isinstance(getattr(trunk, "relu", None), nn.ReLU) and hasattr(trunk, "maxpool")):
            trunk.conv1 = StemConv2d.taking_over(trunk.conv1)
            trunk.relu = nn.Identity()
    return model


class StemConv2d(nn.Conv2d):
    """A ResNet stem's convolution with its ReLU, for inference. On CPU fp32 without autograd it
    runs as one oneDNN call that writes into a buffer kept from call to call (`ScratchBuffers`):
    the stem's output (55 MB at 800x1066), which only the max-pool after it reads, would otherwise
    be mapped and page-faulted afresh by every forward. Elsewhere: conv2d + ReLU."""

    @classmethod
    def taking_over(cls, conv: nn.Conv2d) -> StemConv2d:
        stem = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                   device="meta")
        stem.weight, stem.bias = conv.weight, conv.bias
        stem.scratch = ScratchBuffers()
        return stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _runs_fused_inference(x) or self.bias is None or self.padding_mode != "zeros":
            return F.relu(super().forward(x))
        out = self.scratch.get("out", _conv_output_shape(self, x), x, torch.channels_last).zero_()
        return torch.ops.mkldnn._convolution_pointwise_.binary(out, x, self.weight, self.bias, *_conv_geometry(self),
                                                               "add", 1.0, "relu", [], "")


def _runs_fused_inference(x: torch.Tensor) -> bool:
    """CPU fp32 channels_last input, no autograd, no autocast, not compiling, oneDNN's fused ops there."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and not torch.is_grad_enabled()
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and _mkldnn_pointwise_available())


def _conv_output_shape(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, ...]:
    size = [(x.shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
            // conv.stride[i] + 1 for i in range(2)]
    return (x.shape[0], conv.out_channels, *size)


def fuse_residual_layers(model: nn.Module) -> nn.Module:
    """Every ResNet layer (a Sequential of torchvision BasicBlock/Bottleneck whose norms are already
    folded) becomes a `FusedResidualLayer`: same submodules and names, another forward. Returns `model`."""
    shared = ScratchBuffers()  # the Winograd temporaries: one arena for all layers, sized by the largest
    for module in model.modules():
        if type(module) is nn.Sequential and len(module) and all(_is_folded_block(b) for b in module):
            module.__class__ = FusedResidualLayer  # same modules and state; only the forward differs
            module.scratch = ScratchBuffers()  # this layer's shortcut: alive while the next layer runs
            module.winograd_scratch = shared
    return model


def _is_folded_block(block: nn.Module) -> bool:
    """A torchvision block whose norms are folded away: by fold_frozen_batchnorm (Conv2d + Identity)
    or by fold_frozen_batchnorm_for_training (NormFoldedConv2d + FoldedFrozenBatchNorm2d)."""
    if type(block) not in (BasicBlock, Bottleneck):
        return False
    convs = _block_convs(block)
    norms = [block.bn1, block.bn2] + ([block.bn3] if type(block) is Bottleneck else [])
    if block.downsample is not None:
        if type(block.downsample) is not nn.Sequential or len(block.downsample) != 2:
            return False
        convs.append(block.downsample[0])
        norms.append(block.downsample[1])
    return (all(type(n) in (nn.Identity, FoldedFrozenBatchNorm2d) for n in norms)
            and all(type(c) in (nn.Conv2d, NormFoldedConv2d, WinogradConv2d) and c.padding_mode == "zeros"
                    and not isinstance(c.padding, str) for c in convs))


def _block_convs(block: BasicBlock | Bottleneck) -> list[nn.Conv2d]:
    """The main path's convolutions, in order (the last one is added to the residual)."""
    return [block.conv1, block.conv2] + ([block.conv3] if type(block) is Bottleneck else [])


def _weight_and_bias(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    return conv.folded_weight_and_bias() if isinstance(conv, NormFoldedConv2d) else (conv.weight, conv.bias)


def _mkldnn_pointwise_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")


def _conv_geometry(conv: nn.Conv2d) -> tuple:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


class FusedResidualLayer(nn.Sequential):
    """A ResNet layer whose blocks run each convolution with its ReLU, and the last one with the
    residual addition and ReLU, as single oneDNN calls, the sum written into the residual tensor.
    Past the first block that tensor is the previous block's output, so a forward allocates no new
    activation for it; outputs identical. CPU fp32 without autocast, where no autograd graph is
    needed (inference; the frozen layer1 when training); otherwise, and inside torch.compile, the
    blocks' own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or not (
                x.device.type == "cpu" and x.dtype == torch.float32 and self.needs_no_autograd(x)
                and not torch.is_autocast_enabled("cpu") and _mkldnn_pointwise_available()):
            return super().forward(x)  # compiled: inductor fuses the blocks itself, without graph breaks
        pointwise, pointwise_ = torch.ops.mkldnn._convolution_pointwise, torch.ops.mkldnn._convolution_pointwise_
        # Inference keeps its large temporaries in buffers reused by the next call (not when a
        # frozen layer runs inside a training step: autograd may hold on to them).
        reuse = _runs_fused_inference(x)
        scratch = self.scratch if reuse else None
        winograd_scratch = self.winograd_scratch if reuse else None
        for index, block in enumerate(self):
            convs = _block_convs(block)
            out = x
            for conv in convs[:-1]:
                if type(conv) is WinogradConv2d:
                    out = conv.winograd(out, relu=True, scratch=winograd_scratch)
                else:
                    out = pointwise(out, *_weight_and_bias(conv), *_conv_geometry(conv), "relu", [], "")
            last = convs[-1]
            if block.downsample is None and index == 0:
                # The residual is the caller's tensor: add out of place rather than overwrite it.
                x = pointwise.binary(out, x, *_weight_and_bias(last), *_conv_geometry(last), "add", 1.0, "relu", [],
                                     "")
                continue
            # Otherwise the residual is the downsample's output or the previous block's: used by nothing else.
            residual = x if block.downsample is None else self._downsample(block.downsample[0], x, scratch)
            x = pointwise_.binary(residual, out, *_weight_and_bias(last), *_conv_geometry(last), "add", 1.0, "relu",
                                  [], "")
        return x

    def _downsample(self, conv: nn.Conv2d, x: torch.Tensor, scratch: ScratchBuffers | None) -> torch.Tensor:
        """The first block's shortcut, which becomes the layer's output (the blocks add into it).
        A block glibc would map afresh (layer1's 55 MB at 800x1066) is a kept buffer instead; the
        next call on this thread overwrites it, so what the layer returns is valid until then."""
        shape = _conv_output_shape(conv, x)
        if scratch is None or math.prod(shape) * x.element_size() < ALWAYS_MAPPED_BYTES:
            return conv(x)
        out = scratch.get("shortcut", shape, x, torch.channels_last).zero_()
        return torch.ops.mkldnn._convolution_pointwise_.binary(out, x, *_weight_and_bias(conv), *_conv_geometry(conv),
                                                               "add", 1.0, None, [], None)

    def needs_no_autograd(self, x: torch.Tensor) -> bool:
        """No graph to record: autograd off, or (training) a frozen layer on an input without
        gradient, as layer1 after the frozen stem."""
        return not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in self.parameters()))
