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

    group_detr K > 1 (Group DETR): outputs with K*num_queries rows are K groups; each group is
    matched on its own (every target once per group) and each loss is the mean over the groups:
    the cross-entropy is averaged over all K*Q queries and the box losses are divided by K*num_boxes,
    so K groups that predict the same thing give exactly the K=1 loss. cardinality_error is group
    0's; the mask losses are group 0's (DETRsegm predicts masks for group 0 only). Outputs with
    num_queries rows (the model in eval mode) are one group.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Dict[str, float], eos_coef: float,
                 losses: List[str], mask_loss_on_padding: bool = True, num_queries: Optional[int] = None,
                 group_detr: int = 1):
        super().__init__()
        if group_detr > 1 and num_queries is None:
            raise ValueError("SetCriterion: group_detr > 1 needs num_queries (the size of one group)")
        unknown = set(losses) - {"labels", "boxes", "cardinality", "masks"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        self.mask_loss_on_padding = mask_loss_on_padding
        self.num_queries = num_queries
        self.group_detr = group_detr
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True,
                    class_weight: Optional[float] = None) -> Dict[str, Tensor]:
        """Weighted cross-entropy over every query; class_weight: its normaliser, the sum of the
        class weights of the queries (default: this batch's own, i.e. the weighted mean)."""
        logits = outputs["pred_logits"]
        idx = _src_permutation_idx(indices)
        matched_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_classes
        if class_weight is None:
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        else:
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight,
                                      reduction="sum") / class_weight
        losses = {"loss_ce": loss_ce}
        if log:
            if matched_classes.numel() == 0:
                losses["class_error"] = torch.tensor(100.0, device=logits.device)
            else:
                correct = (logits[idx].argmax(-1) == matched_classes).float().mean() * 100
                losses["class_error"] = 100 - correct
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes, num_groups: int = 1) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"]
        logits = logits[:, :logits.shape[1] // num_groups]  # group 0: the queries the model keeps at inference
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

    def num_groups(self, num_rows: int) -> int:
        """How many query groups outputs with `num_rows` queries hold (1 unless Group DETR training)."""
        if self.group_detr == 1 or num_rows == self.num_queries:
            return 1
        if num_rows == self.group_detr * self.num_queries:
            return self.group_detr
        raise ValueError(f"SetCriterion: outputs have {num_rows} queries; expected {self.num_queries} "
                         f"(one group) or {self.group_detr} x {self.num_queries} (--group_detr {self.group_detr})")

    def class_weight_sum(self, num_images: int, num_boxes: int, num_rows: int) -> float:
        """Sum of the cross-entropy class weights over `num_images` images of `num_rows` query rows
        holding `num_boxes` targets: each target is matched once per group (weight 1), every other
        row is no-object (weight eos_coef). Gradient accumulation normalises by the whole batch's."""
        matched = num_boxes * self.num_groups(num_rows)
        return self.eos_coef * (num_images * num_rows - matched) + matched

    def _match(self, outputs: Dict, targets: List[Dict[str, Tensor]], num_groups: int) -> List[Tuple[Tensor, Tensor]]:
        # A matcher with the original's forward(outputs, targets) signature keeps working without groups.
        if num_groups == 1:
            return self.matcher(outputs, targets)
        return self.matcher(outputs, targets, num_groups=num_groups)

    def _losses(self, outputs: Dict, targets: List[Dict[str, Tensor]], indices: List[Tuple[Tensor, Tensor]],
                num_boxes: float, num_groups: int, aux: bool, class_weight: Optional[float] = None
                ) -> Dict[str, Tensor]:
        losses: Dict[str, Tensor] = {}
        for loss in self.losses:
            if loss == "masks":
                if aux:
                    continue  # intermediate masks are too costly, as in the original
                # group 0 alone, normalised by the boxes of one group
                per_group = outputs["pred_logits"].shape[1] // num_groups
                group0 = [(src[src < per_group], tgt[src < per_group]) for src, tgt in indices]
                losses.update(self.loss_masks(outputs, targets, group0, num_boxes / num_groups))
            elif loss == "labels":
                losses.update(self.loss_labels(outputs, targets, indices, num_boxes, log=not aux,
                                               class_weight=class_weight))
            elif loss == "cardinality":
                losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes, num_groups=num_groups))
            else:
                losses.update(self.get_loss(loss, outputs, targets, indices, num_boxes))
        return losses

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]], num_boxes: Optional[float] = None,
                class_weight: Optional[float] = None) -> Dict[str, Tensor]:
        """outputs of DETR / DETRsegm; targets: labels [N] int64, boxes [N,4] normalised cxcywh, masks [N,H,W].

        num_boxes: the box/mask loss normaliser; default the batch's boxes averaged over processes.
        class_weight: the cross-entropy normaliser (class_weight_sum); default this batch's own.
        Gradient accumulation passes both for the whole accumulated batch."""
        try:
            check_labels(torch.cat([t["labels"] for t in targets]), self.num_classes, "SetCriterion")
        except ValueError:
            for i, t in enumerate(targets):  # say which image holds the bad label
                check_labels(t["labels"], self.num_classes, f"SetCriterion (image {i} of the batch)")
            raise
        main_outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        num_groups = self.num_groups(outputs["pred_logits"].shape[1])
        indices = self._match(main_outputs, targets, num_groups)
        if num_boxes is None:
            num_boxes = _num_boxes(targets, outputs["pred_logits"].device)
        # Each target is matched once per group: the mean over groups divides by K * num_boxes.
        num_boxes = num_boxes * num_groups
        losses = self._losses(outputs, targets, indices, num_boxes, num_groups, aux=False, class_weight=class_weight)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            indices = self._match(aux, targets, num_groups)
            l_dict = self._losses(aux, targets, indices, num_boxes, num_groups, aux=True, class_weight=class_weight)
            losses.update({f"{k}_{i}": v for k, v in l_dict.items()})
        return losses


def _src_permutation_idx(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


def _tgt_permutation_idx(indices: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
    return batch_idx, torch.cat([tgt for _, tgt in indices])
