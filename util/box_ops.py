"""Box conversions and overlaps.

Formats: `cxcywh` = (centre x, centre y, width, height); `xyxy` = (x0, y0, x1, y1). Both may be
normalised to [0, 1] or absolute pixels; these functions do not care which.
"""
import torch
from torch import Tensor
from torchvision.ops import generalized_box_iou as _tv_giou
from torchvision.ops import masks_to_boxes as _tv_masks_to_boxes


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy."""
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh."""
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[N, 4] xyxy -> [N] areas."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of [N, 4] and [M, 4] xyxy boxes -> (iou [N, M], union [N, M])."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area1[:, None] + area2 - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU of [N, 4] and [M, 4] xyxy boxes -> [N, M] in [-1, 1].

    Degenerate boxes (x1 < x0 or y1 < y0) are refused: they give a meaningless GIoU.
    """
    if not bool((boxes1[:, 2:] >= boxes1[:, :2]).all()):
        raise ValueError("generalized_box_iou: boxes1 has x1 < x0 or y1 < y0 (expected xyxy boxes)")
    if not bool((boxes2[:, 2:] >= boxes2[:, :2]).all()):
        raise ValueError("generalized_box_iou: boxes2 has x1 < x0 or y1 < y0 (expected xyxy boxes)")
    return _tv_giou(boxes1, boxes2)


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matching rows of [N, 4] and [N, 4] xyxy boxes -> [N] (the diagonal of the pairwise one)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    inter = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    hull = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(-1)
    return inter / union - (hull - union) / hull


def masks_to_boxes(masks: Tensor) -> Tensor:
    """[N, H, W] masks -> [N, 4] xyxy boxes (inclusive pixel indices); an empty input gives [0, 4]."""
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device)
    return _tv_masks_to_boxes(masks)


__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_area", "box_iou", "generalized_box_iou",
           "elementwise_generalized_box_iou", "masks_to_boxes"]
