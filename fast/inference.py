"""`optimize_for_inference(model)`: the fastest fp32 inference form of a DETR model (predict.py,
main.py --fuse_eval, the benchmarks), in torch or in ONNX Runtime."""
from __future__ import annotations

import os
from typing import Callable

from torch import nn

from fast.attention import use_fast_attention
from fast.channels_last import to_channels_last
from fast.folding import fold_frozen_batchnorm
from fast.fused_layers import fuse_residual_layers, fuse_stem
from fast.winograd import winograd_convolutions

INFERENCE_BACKENDS = ("torch", "onnxruntime")


def optimize_for_inference(model: nn.Module, backend: str = "torch",
                           onnx_cache_dir: str | os.PathLike | None = None,
                           winograd: bool = True) -> nn.Module | Callable:
    """`model` in eval mode with frozen norms folded into the convolutions, the ResNet's wide 3x3
    convolutions as Winograd F(4x4, 3x3) (`winograd`; CPU), the stem and residual layers as fused
    oneDNN calls writing large outputs into kept buffers (CPU), the attention's CPU shortcuts and
    channels_last; changed in place. Same forward contract (images [B,3,H,W], a list of [3,H,W] or a
    NestedTensor -> the outputs dict), outputs equal to the plain model's up to fp32 rounding. What
    the model returns is always new, but tensors taken from inside its backbone are valid until its
    next call on the same thread. Its state_dict no longer has the checkpoint's layout: load weights
    before, never train or save after.

    backend='onnxruntime' (CPU, detection models): the folded model exported once to
    `onnx_cache_dir` (keyed by its weights' hash) and run by ONNX Runtime, returned as a callable
    with the same contract giving pred_logits and pred_boxes (fast/onnx_runtime.py).
    """
    if backend not in INFERENCE_BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(INFERENCE_BACKENDS)}")
    model.eval()
    fold_frozen_batchnorm(model)
    if backend == "onnxruntime":
        from fast.onnx_runtime import onnx_runtime_model

        if onnx_cache_dir is None:
            raise ValueError("backend='onnxruntime' needs onnx_cache_dir, where the export is cached")
        return onnx_runtime_model(model, onnx_cache_dir)
    if winograd:
        winograd_convolutions(model)
    fuse_stem(model)
    fuse_residual_layers(model)
    use_fast_attention(model)
    return to_channels_last(model)
