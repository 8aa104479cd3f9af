"""Detections from DETR outputs (scored boxes in picture pixels over the real categories) and the
names of their categories."""
from __future__ import annotations

import argparse

import torch

COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}


def category_names(args: argparse.Namespace, checkpoint: dict) -> dict[int, str]:
    """Category id -> name: saved in the checkpoint, else from the dataset's annotations, else COCO's."""
    for source in (checkpoint.get("category_names"), getattr(args, "category_names", None)):
        if source:
            items = source.items() if isinstance(source, dict) else enumerate(source)
            return {int(k): str(v) for k, v in items if v is not None}
    try:
        import datasets

        names = datasets.category_names(args)
        if names:
            return {int(k): str(v) for k, v in names.items()}
    except Exception as err:  # annotations of the training machine are often absent here
        if getattr(args, "dataset_file", "coco") not in ("coco", "coco_panoptic"):
            print(f"note: category names unavailable ({type(err).__name__}: {err}); writing ids")
    if getattr(args, "dataset_file", "coco") == "coco" and args.num_classes == 91:
        return dict(COCO_CATEGORY_NAMES)
    return {}


def detections(outputs: dict[str, torch.Tensor], sizes_hw: torch.Tensor, valid_ids: list[int] | None,
               threshold: float) -> list[dict[str, torch.Tensor]]:
    """Per image: scores [N], labels [N], boxes [N,4] absolute xyxy in original pixels, query index [N].

    Score/label = max softmax probability over the real classes (no-object excluded; when
    `valid_ids` is given, over those category ids only). Only scores above `threshold` are kept.
    """
    prob = outputs["pred_logits"].softmax(-1)[..., :-1]
    if valid_ids is not None:
        keep_class = torch.zeros(prob.shape[-1], dtype=torch.bool, device=prob.device)
        keep_class[[i for i in valid_ids if 0 <= i < prob.shape[-1]]] = True
        prob = prob.masked_fill(~keep_class, 0)
    scores, labels = prob.max(-1)
    cx, cy, w, h = outputs["pred_boxes"].unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    img_h, img_w = sizes_hw.unbind(1)
    boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
    results = []
    for s, l, b in zip(scores, labels, boxes):
        keep = s > threshold
        results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep],
                        "queries": keep.nonzero().flatten()})
    return results
