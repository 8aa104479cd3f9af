"""ONNX Runtime backend of fast.optimize_for_inference, for CPU inference of detection models.

The BN-folded model is exported once (torch.onnx, opset 17) with inputs `images` [B,3,H,W]
float32 and `mask` [B,H,W] bool (True on padding), B, H and W dynamic, and outputs `pred_logits`
[B,Q,C+1] and `pred_boxes` [B,Q,4] (normalised cxcywh). The file is cached under a name keyed by
the hash of the model's architecture and weights, so a second run with the same checkpoint loads it
instead of exporting again.
`OnnxRuntimeDETR` then stands where the model stood: it takes what DETR.forward takes and returns
the same two outputs as torch tensors. Segmentation models (--masks) stay on the torch backend.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from util.nested_tensor import NestedTensor


class _ImagesAndMask(nn.Module):
    """DETR with its NestedTensor input split into two tensors, and its two main outputs as a tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(NestedTensor(images, mask))
        return out["pred_logits"], out["pred_boxes"]


def weights_key(model: nn.Module) -> str:
    """16 hex digits of the sha256 of the model's architecture (repr) and every state_dict tensor."""
    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def export_detr_onnx(model: nn.Module, path: str | os.PathLike) -> Path:
    """Export a detection DETR (eval mode, ideally BN-folded) to `path`, batch/height/width dynamic.

    The TorchScript-based exporter is much quicker than the dynamo one for the same graph (same
    outputs to fp32 rounding); the dynamo exporter is the fallback for a torch without the former.
    Written to a temporary name and renamed, so a killed export never leaves a truncated cache file.
    """
    path = Path(path)
    if hasattr(model, "detr"):
        raise ValueError("the ONNX Runtime backend covers detection models; a --masks model runs on torch")
    model.eval()
    # Batch 2 and unequal sides in the example, so that no size is taken for a constant.
    example = (torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool))
    names = {"input_names": ["images", "mask"], "output_names": ["pred_logits", "pred_boxes"]}
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
                torch.onnx.export(_ImagesAndMask(model), example, str(partial), dynamo=False, opset_version=17,
                                  dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                                "mask": {0: "batch", 1: "height", 2: "width"}}, **names)
        except (TypeError, RuntimeError, NotImplementedError):
            batch = torch.export.Dim("batch", min=1, max=256)
            height, width = torch.export.Dim("height", min=32, max=4096), torch.export.Dim("width", min=32, max=4096)
            torch.onnx.export(_ImagesAndMask(model), example, str(partial), dynamo=True, verbose=False,
                              dynamic_shapes={"images": {0: batch, 2: height, 3: width},
                                              "mask": {0: batch, 1: height, 2: width}}, **names)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


class OnnxRuntimeDETR:
    """An ONNX Runtime session with DETR's forward contract: images [B,3,H,W], a list of [3,H,W]
    tensors or a NestedTensor -> {'pred_logits', 'pred_boxes'} (CPU torch tensors)."""

    def __init__(self, onnx_path: str | os.PathLike, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.onnx_path = Path(onnx_path)
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def __call__(self, samples) -> dict[str, torch.Tensor]:
        from models.detr import as_nested_tensor

        images, mask = as_nested_tensor(samples).decompose()
        logits, boxes = self.session.run(None, {"images": np.ascontiguousarray(images.float().cpu().numpy()),
                                                "mask": mask.cpu().numpy()})
        return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}

    def eval(self) -> OnnxRuntimeDETR:
        return self


def onnx_runtime_model(model: nn.Module, cache_dir: str | os.PathLike) -> OnnxRuntimeDETR:
    """`model` (eval mode, BN-folded) as an OnnxRuntimeDETR, exported to cache_dir/detr-<key>.onnx unless
    that file exists already (key: weights_key of the model)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"detr-{weights_key(model)}.onnx"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        print(f"onnxruntime: exporting the model once to {path} (cached for later runs)", flush=True)
        export_detr_onnx(model, path)
    else:
        print(f"onnxruntime: using the cached export {path}", flush=True)
    return OnnxRuntimeDETR(path)
