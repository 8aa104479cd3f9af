"""Dense one-to-many supervision of the encoder (training only, --dense_aux COEF).

DETR's only training signal is the one-to-one set loss on a few decoder queries, so a backbone
and encoder learned from scratch receive sparse, slowly-stabilising gradients. Co-DETR (Zong et
al., ICCV 2023) adds auxiliary heads trained with one-to-many assignments on the encoder output
and drops them at inference. This is the simplest such head: every encoder token (one per cell of
the C5 feature map) predicts a class and a box; a token is a positive of the ground-truth box that
contains its cell centre (the smallest such box), and the cell holding a box's centre is always
one of its positives; every other real (unpadded) token is "no object". The head's weights live
under `dense_aux_head.` and are left out when the checkpoint is loaded into a plain DETR, so the
inference model is unchanged.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou


class DenseAuxHead(nn.Module):
    """memory [B, d, H, W] + padding mask [B, H, W] -> per-token logits [B, H*W, C+1] and boxes [B, H*W, 4].

    Boxes are normalised cxcywh of the unpadded image; the centre is predicted as an offset from
    the token's cell centre (in logit space), so a fresh head already points at its own cell.
    """

    def __init__(self, hidden_dim: int, num_classes: int):
        super().__init__()
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 4))
        nn.init.zeros_(self.bbox_embed[-1].weight)
        nn.init.zeros_(self.bbox_embed[-1].bias)

    def forward(self, memory: Tensor, mask: Tensor) -> Dict[str, Tensor]:
        tokens = memory.flatten(2).transpose(1, 2)  # [B, HW, d]
        centres = cell_centres(mask)  # [B, HW, 2]
        ref = torch.cat([torch.logit(centres.clamp(1e-4, 1 - 1e-4)), torch.full_like(centres, -1.5)], dim=-1)
        return {"pred_logits": self.class_embed(tokens), "pred_boxes": (self.bbox_embed(tokens) + ref).sigmoid(),
                "centres": centres, "valid": ~mask.flatten(1)}


def cell_centres(mask: Tensor) -> Tensor:
    """Padding mask [B, H, W] (True = padding) -> each cell's centre [B, H*W, 2] as (x, y) normalised
    by that image's unpadded extent (the frame of its normalised target boxes)."""
    valid = ~mask
    rows = valid[:, :, 0].sum(1).clamp(min=1).to(torch.float32)  # unpadded height in cells
    cols = valid[:, 0, :].sum(1).clamp(min=1).to(torch.float32)
    h, w = mask.shape[-2:]
    ys = (torch.arange(h, device=mask.device, dtype=torch.float32) + 0.5)[None, :, None] / rows[:, None, None]
    xs = (torch.arange(w, device=mask.device, dtype=torch.float32) + 0.5)[None, None, :] / cols[:, None, None]
    return torch.stack([xs.expand(-1, h, w), ys.expand(-1, h, w)], dim=-1).flatten(1, 2)


@torch.no_grad()
def assign(centres: Tensor, valid: Tensor, targets: List[Dict[str, Tensor]]) -> Tensor:
    """Target index per token [B, HW] (-1 = no object) by the rule in the module docstring."""
    assigned = torch.full(valid.shape, -1, dtype=torch.int64, device=centres.device)
    for i, t in enumerate(targets):
        boxes = t["boxes"].to(centres)
        if len(boxes) == 0:
            continue
        xyxy = box_cxcywh_to_xyxy(boxes)
        c = centres[i][:, None, :]  # [HW, 1, 2]
        inside = (c >= xyxy[None, :, :2]).all(-1) & (c <= xyxy[None, :, 2:]).all(-1)  # [HW, N]
        # the token nearest each box centre is always a positive of that box
        nearest = torch.cdist(boxes[:, :2], centres[i].masked_fill(~valid[i, :, None], 1e4)).argmin(1)
        inside[nearest, torch.arange(len(boxes), device=boxes.device)] = True
        area = (boxes[:, 2] * boxes[:, 3])[None, :].expand_as(inside).masked_fill(~inside, float("inf"))
        best_area, best = area.min(1)
        assigned[i] = torch.where(torch.isfinite(best_area) & valid[i], best, assigned[i])
    return assigned


def dense_losses(outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]], empty_weight: Tensor,
                 num_positives_floor: float = 1.0) -> Dict[str, Tensor]:
    """loss_ce_dense (weighted CE over real tokens, no-object weighted like the set loss), and
    loss_bbox_dense / loss_giou_dense (L1 and 1 - GIoU over positive tokens, / their count)."""
    assigned = assign(outputs["centres"], outputs["valid"], targets)
    num_classes = outputs["pred_logits"].shape[-1] - 1
    labels = torch.full_like(assigned, num_classes)
    target_boxes = torch.zeros(*assigned.shape, 4, device=assigned.device)
    for i, t in enumerate(targets):
        pos = assigned[i] >= 0
        labels[i, pos] = t["labels"][assigned[i, pos]]
        target_boxes[i, pos] = t["boxes"][assigned[i, pos]].to(target_boxes)
    valid = outputs["valid"]
    logits = outputs["pred_logits"][valid]
    loss_ce = F.cross_entropy(logits, labels[valid], empty_weight)
    pos = assigned >= 0
    num_pos = max(float(pos.sum()), num_positives_floor)
    src, tgt = outputs["pred_boxes"][pos], target_boxes[pos]
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
    return {"loss_ce_dense": loss_ce, "loss_bbox_dense": F.l1_loss(src, tgt, reduction="sum") / num_pos,
            "loss_giou_dense": (1 - giou).sum() / num_pos}


def dense_weights(coef: float, bbox_coef: float, giou_coef: float) -> Dict[str, float]:
    return {"loss_ce_dense": coef, "loss_bbox_dense": coef * bbox_coef, "loss_giou_dense": coef * giou_coef}


__all__: Tuple[str, ...] = ("DenseAuxHead", "assign", "cell_centres", "dense_losses", "dense_weights")
