"""One-to-one assignment of predictions to targets (Hungarian algorithm), per image."""
from typing import Dict, List, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from util.box_ops import box_cxcywh_to_xyxy


def check_labels(labels: Tensor, num_classes: int, where: str) -> None:
    """Raise a clear error for a label outside [0, num_classes) (one host sync for the whole tensor)."""
    if labels.numel() == 0:
        return
    low, high = torch.aminmax(labels)
    low, high = int(low), int(high)
    if high >= num_classes or low < 0:
        bad = high if high >= num_classes else low
        raise ValueError(f"{where}: target label {bad} is outside [0, num_classes={num_classes}); "
                         "num_classes must be the largest category id + 1 (set --num_classes or fix the annotations)")


def _explain_non_finite(logits: Tensor, boxes: Tensor, targets: List[Dict[str, Tensor]]) -> ValueError:
    """Name the first non-finite input of a cost matrix that was found to hold NaN/inf."""
    culprits = [("pred_logits", logits), ("pred_boxes", boxes)]
    culprits += [(f"target boxes of image {i}", t["boxes"]) for i, t in enumerate(targets)]
    for what, tensor in culprits:
        if not bool(torch.isfinite(tensor).all()):
            return ValueError(f"HungarianMatcher: {what} contains NaN/inf (the model diverged or the input is corrupt)")
    return ValueError("HungarianMatcher: the GIoU cost contains NaN/inf (degenerate zero-area boxes)")


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
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]],
                num_groups: int = 1) -> List[Tuple[Tensor, Tensor]]:
        """outputs: pred_logits [B,Q,C+1], pred_boxes [B,Q,4] cxcywh; targets: labels [N], boxes [N,4] cxcywh.

        Returns per image (query indices sorted, matching target indices), int64 on the CPU.
        num_groups K (Group DETR): the Q queries are K consecutive groups of Q/K and each group is
        matched on its own, so every target gets one query in each group; the query indices run
        over all Q (group g's are g*Q/K + i) and the target indices repeat once per group.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {logits.shape[0]} images")
        num_classes = logits.shape[-1] - 1
        check_labels(torch.cat([t["labels"] for t in targets]), num_classes, "HungarianMatcher")
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.dtype)
        if target_boxes.numel() and not bool((target_boxes[:, 2:] >= 0).all()):
            raise ValueError("HungarianMatcher: a target box has negative width or height (expected cxcywh)")
        prob = logits.softmax(-1)
        # Each image's [Q, n_i] block only; the blocks travel to the CPU together in one copy.
        blocks = []
        for i, target in enumerate(targets):
            labels, tb = target["labels"], target["boxes"].to(boxes.dtype)
            cost_class = -prob[i][:, labels]
            cost_bbox = torch.cdist(boxes[i], tb, p=1)
            cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes[i]), box_cxcywh_to_xyxy(tb))
            blocks.append(self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou)
        flat = torch.cat([b.flatten() for b in blocks])
        if not bool(torch.isfinite(flat).all()):
            raise _explain_non_finite(logits, boxes, targets)
        flat = flat.float().cpu()
        num_queries = logits.shape[1]
        if num_queries % num_groups != 0:
            raise ValueError(f"HungarianMatcher: {num_queries} queries do not split into {num_groups} groups")
        per_group = num_queries // num_groups
        indices = []
        for block in flat.split([b.numel() for b in blocks]):
            num_targets = block.numel() // num_queries
            if num_targets == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            costs = block.view(num_queries, num_targets).numpy()
            pairs = [linear_sum_assignment(costs[g * per_group:(g + 1) * per_group]) for g in range(num_groups)]
            rows = np.concatenate([r + g * per_group for g, (r, _) in enumerate(pairs)])
            cols = np.concatenate([c for _, c in pairs])
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou)
