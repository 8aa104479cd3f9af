"""DETR's set loss: match predictions to targets, then classification, box and mask losses."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

from models.matcher import check_labels
from util.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from util.nested_tensor import nested_tensor_from_tensor_list


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2,
                       valid: Optional[Tensor] = None) -> Tensor:
    """Focal loss of mask logits [N, P] against 0/1 targets [N, P]: mean over (valid) pixels, summed, / num_boxes."""
    loss = _tv_sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=gamma, reduction="none")
    if valid is None:
        return loss.mean(1).sum() / num_boxes
    return ((loss * valid).sum(1) / valid.sum(1).clamp(min=1)).sum() / num_boxes


def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: float, valid: Optional[Tensor] = None) -> Tensor:
    """1 - (2 * intersection + 1) / (pred sum + target sum + 1) per mask, summed, / num_boxes."""
    inputs = inputs.sigmoid().flatten(1)
    if valid is not None:
        inputs = inputs * valid
        targets = targets * valid
    numerator = 2 * (inputs * targets).sum(1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def _num_boxes(targets: List[Dict[str, Tensor]], device: torch.device) -> float:
    """Target boxes in the batch, averaged over processes, at least 1."""
    num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        world = dist.get_world_size()
    return torch.clamp(num / world, min=1).item()


class SetCriterion(nn.Module):
    """Losses of DETR. `losses` is a list among 'labels', 'boxes', 'cardinality', 'masks'.

    num_classes excludes no-object; eos_coef weights the no-object class in the cross-entropy.
    mask_loss_on_padding=True (the original) treats padded target pixels as background; False
    leaves them out of the mask losses.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float], eos_coef: float,
                 losses: List[str], mask_loss_on_padding: bool = True):
        super().__init__()
        unknown = set(losses) - {"labels", "boxes", "cardinality", "masks"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        self.mask_loss_on_padding = mask_loss_on_padding
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"]
        idx = _src_permutation_idx(indices)
        matched_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_classes
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            if matched_classes.numel() == 0:
                losses["class_error"] = torch.tensor(100.0, device=logits.device)
            else:
                correct = (logits[idx].argmax(-1) == matched_classes).float().mean() * 100
                losses["class_error"] = 100 - correct
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"]
        target_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), target_lengths.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        idx = _src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_masks(self, outputs, targets, indices, num_boxes) -> Dict[str, Tensor]:
        src_masks = outputs["pred_masks"][_src_permutation_idx(indices)]
        # Padding the [N_i, H_i, W_i] stacks pads both the object count and the pixels.
        padded = nested_tensor_from_tensor_list([t["masks"] for t in targets])
        tgt_idx = _tgt_permutation_idx(indices)
        target_masks = padded.tensors.to(src_masks)[tgt_idx]
        src_masks = F.interpolate(src_masks[:, None], size=target_masks.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0].flatten(1)
        target_masks = target_masks.flatten(1)
        valid = None
        if not self.mask_loss_on_padding:
            valid = (~padded.mask).to(src_masks)[tgt_idx[0]].flatten(1)
        return {"loss_mask": sigmoid_focal_loss(src_masks, target_masks, num_boxes, valid=valid),
                "loss_dice": dice_loss(src_masks, target_masks, num_boxes, valid=valid)}

    def get_loss(self, loss, outputs, targets, indices, num_boxes, **kwargs) -> Dict[str, Tensor]:
        fns = {"labels": self.loss_labels, "cardinality": self.loss_cardinality,
               "boxes": self.loss_boxes, "masks": self.loss_masks}
        return fns[loss](outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]],
                num_boxes: Optional[float] = None) -> Dict[str, Tensor]:
        """outputs of DETR / DETRsegm; targets: labels [N] int64, boxes [N,4] normalised cxcywh, masks [N,H,W].

        num_boxes: the box/mask loss normaliser; default the batch's boxes averaged over processes
        (gradient accumulation passes the count of the whole accumulated batch)."""
        try:
            check_labels(torch.cat([t["labels"] for t in targets]), self.num_classes, "SetCriterion")
        except ValueError:
            for i, t in enumerate(targets):  # say which image holds the bad label
                check_labels(t["labels"], self.num_classes, f"SetCriterion (image {i} of the batch)")
            raise
        main_outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(main_outputs, targets)
        if num_boxes is None:
            num_boxes = _num_boxes(targets, outputs["pred_logits"].device)
        losses: Dict[str, Tensor] = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux, targets)
            for loss in self.losses:
                if loss == "masks":
                    continue  # intermediate masks are too costly, as in the original
                kwargs = {"log": False} if loss == "labels" else {}
                l_dict = self.get_loss(loss, aux, targets, indices, num_boxes, **kwargs)
                losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        return losses


def _src_permutation_idx(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


def _tgt_permutation_idx(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
    return batch_idx, torch.cat([tgt for _, tgt in indices])
