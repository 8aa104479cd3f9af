"""One-to-one assignment of predictions to targets (Hungarian algorithm), per image."""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def check_labels(labels: Tensor, num_classes: int, where: str) -> None:
    """Raise a clear error for a label outside [0, num_classes)."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if high >= num_classes or low < 0:
        bad = high if high >= num_classes else low
        raise ValueError(f"{where}: target label {bad} is outside [0, num_classes={num_classes}); "
                         "num_classes must be the largest category id + 1 (set --num_classes or fix the annotations)")


def _require_finite(tensor: Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"HungarianMatcher: {what} contains NaN/inf (the model diverged or the input is corrupt)")


class HungarianMatcher(nn.Module):
    """cost = cost_bbox * L1(cxcywh) - cost_class * p(target class) - cost_giou * GIoU(xyxy)."""

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """outputs: pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh; targets: labels [N], boxes [N,4] cxcywh.

        Returns per image (query indices sorted, matching target indices), int64 on the CPU.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {logits.shape[0]} images")
        _require_finite(logits, "pred_logits")
        _require_finite(boxes, "pred_boxes")
        num_classes = logits.shape[-1] - 1
        prob = logits.softmax(-1)
        indices = []
        for i, target in enumerate(targets):
            labels, target_boxes = target["labels"], target["boxes"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            check_labels(labels, num_classes, "HungarianMatcher")
            _require_finite(target_boxes, f"target boxes of image {i}")
            cost_class = -prob[i][:, labels]
            cost_bbox = torch.cdist(boxes[i], target_boxes.to(boxes.dtype), p=1)
            cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes[i]), box_cxcywh_to_xyxy(target_boxes.to(boxes.dtype)))
            _require_finite(cost_giou, f"the GIoU cost of image {i} (degenerate zero-area boxes)")
            cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
            # Only this image's [Q, n_i] block goes to the CPU.
            rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou)
