"""Fast paths that keep the numbers (within fp32 rounding). Two entry points, used by predict.py,
main.py and the benchmarks alike:

- `optimize_for_inference(model)`: eval mode, every frozen norm folded into the convolution before
  it (scaled weights plus a bias; the norm becomes an Identity), the wide stride-1 3x3
  convolutions as Winograd F(4x4, 3x3) (models/winograd.py), the stem's convolution with its ReLU
  (`StemConv2d`), ResNet layers as `FusedResidualLayer` (convolution + ReLU + residual addition in
  single oneDNN calls on the CPU), channels_last. On the CPU the stem's output, layer1's shortcut
  and the Winograd temporaries live in buffers kept from call to call (models/scratch.py), so a
  forward does not page-fault them afresh; what the model returns is always new, but tensors taken
  from inside its backbone are valid until its next call on the same thread. The state_dict
  changes: apply it after loading weights, and do not train or save the result. With backend='onnxruntime' the folded model runs in ONNX Runtime instead
  (CPU; models/onnx_runtime.py).
- `optimize_for_training(model)`: every FrozenBatchNorm2d after a convolution is computed inside
  that convolution, conv2d(x, W * s, b'), from the same parameters and buffers, plus channels_last.
  Same forward, same gradients (up to fp32 rounding), and the same state_dict keys and values, so
  checkpoints keep the original's layout; trainable BatchNorm2d (--backbone_weights none) is left as is.
  Dropout on the CPU draws the dropped positions instead of a mask (models/dropout.py; same
  distribution, other draws than F.dropout).
Both change `model` in place and return it; they wrap whatever DETR-like model they get.

The building blocks, `fold_frozen_batchnorm` and `to_channels_last`, are public for scripts that
want only one of them.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from models.attention import MultiheadAttention
from models.dropout import SparseDropout
from models.scratch import ALWAYS_MAPPED_BYTES, ScratchBuffers
from models.winograd import WinogradConv2d, eligible as winograd_eligible

INFERENCE_BACKENDS = ("torch", "onnxruntime")


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


def optimize_for_inference(model: nn.Module, backend: str = "torch",
                           onnx_cache_dir: str | os.PathLike | None = None,
                           winograd: bool = True) -> nn.Module | Callable:
    """The fastest fp32 inference form of `model`: eval mode, frozen norms folded into the
    convolutions, the ResNet's wide 3x3 convolutions as Winograd F(4x4, 3x3) (`winograd`; CPU),
    fused residual layers, channels_last (in place). Same forward contract (images
    [B,3,H,W], a list of [3,H,W] or a NestedTensor -> the outputs dict); outputs within ~1e-5 of the
    plain model. Its state_dict no longer has the checkpoint's layout: load weights before, never
    save after.

    backend='onnxruntime' (CPU, detection models): the folded model exported once to
    `onnx_cache_dir` (keyed by its weights' hash) and run by ONNX Runtime, returned as a callable
    with the same contract giving pred_logits and pred_boxes (models/onnx_runtime.py).
    """
    if backend not in INFERENCE_BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(INFERENCE_BACKENDS)}")
    model.eval()
    fold_frozen_batchnorm(model)
    if backend == "onnxruntime":
        from models.onnx_runtime import onnx_runtime_model

        if onnx_cache_dir is None:
            raise ValueError("backend='onnxruntime' needs onnx_cache_dir, where the export is cached")
        return onnx_runtime_model(model, onnx_cache_dir)
    if winograd:
        winograd_convolutions(model)
    fuse_stem(model)
    fuse_residual_layers(model)
    return to_channels_last(model)


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
    the 55 MB output at 800x1066, which only the max-pool after it reads, is otherwise mapped and
    page-faulted afresh by every forward (110 vs 13 ms here). Elsewhere: conv2d + ReLU."""

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


# Below 128 channels the tile transforms cost more than the 4x fewer multiply-adds save (layer1).
WINOGRAD_MIN_CHANNELS = 128


@torch.no_grad()
def winograd_convolutions(model: nn.Module, min_channels: int = WINOGRAD_MIN_CHANNELS) -> nn.Module:
    """Every ResNet block's stride-1 3x3 convolution with >= `min_channels` inputs becomes a
    `WinogradConv2d` (same weights; CPU fp32 inference only, elsewhere the same convolution).
    Call it after fold_frozen_batchnorm (it transforms the weights as they are then); returns `model`."""
    for block in model.modules():
        if type(block) in (BasicBlock, Bottleneck):
            for name in ("conv1", "conv2") if type(block) is BasicBlock else ("conv2",):
                conv = getattr(block, name)
                if winograd_eligible(conv) and conv.in_channels >= min_channels:
                    setattr(block, name, WinogradConv2d.taking_over(conv))
    return model


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
    or by optimize_for_training (NormFoldedConv2d + FoldedFrozenBatchNorm2d)."""
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
    residual addition and ReLU, as single oneDNN calls (the ops inductor's CPU freezing emits), the
    sum written into the residual tensor. Past the first block that tensor is the previous block's
    output, so a forward allocates no new activation for it: ~1.1x for R50-DETR on CPU, outputs
    identical. CPU fp32 without autocast, where no autograd graph is needed (inference; the frozen
    layer1 when training); otherwise, and inside torch.compile, the blocks' own forward."""

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
            # outputs (same products, same sums) and oneDNN's weight gradient of a stride-1 conv is
            # ~1.7x faster (layer2's downsample, whose input from the frozen layer1 needs no gradient).
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


def optimize_for_training(model: nn.Module, sparse_dropout: bool = True) -> nn.Module:
    """The faster training form of `model` (in place): each conv -> FrozenBatchNorm2d pair runs
    as one NormFoldedConv2d (skipping two elementwise passes over the activation and their
    backward), and channels_last. With `sparse_dropout`, dropout (nn.Dropout modules and the
    attention weights' dropout) draws the dropped positions instead of a mask on the CPU
    (models/dropout.py): same distribution, other draws than F.dropout for the same seed.
    Parameters, buffers and state_dict keys are unchanged, so the optimiser, DDP and checkpoints
    see the original layout; with the same dropout draws (or none) the loss equals the plain
    model's up to fp32 rounding. Apply before building the optimiser or wrapping in DDP; deepcopy
    works after."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not FrozenBatchNorm2d:  # not trainable BatchNorm2d, not already folded
                continue
            conv_name = _conv_before(parent, name)
            if conv_name is None or type(getattr(parent, conv_name)) is not nn.Conv2d:
                continue
            norm = FoldedFrozenBatchNorm2d.taking_over(child)
            setattr(parent, conv_name, NormFoldedConv2d.taking_over(getattr(parent, conv_name), norm))
            setattr(parent, name, norm)
    fuse_residual_layers(model)  # the frozen layer1 (and evaluation under no_grad) run fused
    if sparse_dropout:
        for module in model.modules():
            if type(module) is nn.Dropout:
                module.__class__ = SparseDropout  # a subclass without state: p and inplace carry over
            elif isinstance(module, MultiheadAttention):
                module.sparse_dropout = True
    return to_channels_last(model)
