"""DETR: backbone -> transformer -> class and box heads; PostProcess to absolute boxes; build(args)."""
from typing import Dict, List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone import build_backbone
from models.criterion import SetCriterion
from models.matcher import build_matcher
from models.transformer import build_transformer
from util.box_ops import box_cxcywh_to_xyxy
from util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list

__all__ = ["DETR", "MLP", "PostProcess", "SetCriterion", "as_nested_tensor", "build"]


def as_nested_tensor(samples: Union[NestedTensor, Tensor, List[Tensor]]) -> NestedTensor:
    """NestedTensor, [B,3,H,W] tensor (no padding) or list of [3,H,W] tensors -> NestedTensor."""
    if isinstance(samples, NestedTensor):
        return samples
    if isinstance(samples, torch.Tensor):
        if samples.dim() != 4:
            raise ValueError(f"DETR expects images [B, 3, H, W], got a tensor of shape {list(samples.shape)}")
        # Every pixel is real: same result as padding a list of equal-size images, but traceable.
        mask = torch.zeros_like(samples[:, 0], dtype=torch.bool)
        return NestedTensor(samples, mask)
    return nested_tensor_from_tensor_list(list(samples))


class MLP(nn.Module):
    """num_layers Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        dims = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + dims, dims + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class DETR(nn.Module):
    """forward(samples) -> {'pred_logits' [B,Q,num_classes+1], 'pred_boxes' [B,Q,4] normalised cxcywh,
    'aux_outputs' (with aux_loss): one such dict per earlier decoder layer}.

    group_detr K > 1 (Group DETR, training only): K-1 more groups of num_queries queries live in
    `group_query_embed` [(K-1)*Q, d]. In train mode the decoder runs all K groups (self-attention
    inside each group) and the outputs have K*Q rows, group g in rows g*Q..(g+1)*Q-1; in eval mode
    only group 0 (`query_embed`) runs, so the model at inference is the plain DETR.
    """

    def __init__(self, backbone: nn.Module, transformer: nn.Module, num_classes: int, num_queries: int,
                 aux_loss: bool = False, group_detr: int = 1):
        super().__init__()
        if group_detr < 1:
            raise ValueError(f"--group_detr must be at least 1 (1 = the original DETR), got {group_detr}")
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.group_detr = group_detr
        if group_detr > 1:
            # Created last, so every other tensor's initialisation is the same as with K=1.
            self.group_query_embed = nn.Embedding((group_detr - 1) * num_queries, hidden_dim)

    def query_groups(self) -> Tuple[Tensor, int]:
        """(queries [G*Q, d], G): every group while training with group_detr > 1, else group 0 alone."""
        if self.training and self.group_detr > 1:
            return self._all_groups(), self.group_detr
        return self.query_embed.weight, 1

    @torch.jit.unused
    def _all_groups(self) -> Tensor:
        return torch.cat([self.query_embed.weight, self.group_query_embed.weight])

    def forward(self, samples: NestedTensor):
        if not isinstance(samples, NestedTensor):
            samples = as_nested_tensor(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        assert mask is not None
        queries, num_groups = self.query_groups()
        hs = self.transformer(self.input_proj(src), mask, queries, pos[-1], num_groups)[0]
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(outputs_class, outputs_coord)
        return out

    # No return annotation on purpose: TorchScript then types this unused method as returning a
    # Tensor, which fits `out`'s Dict[str, Tensor]; scripted models run with aux_loss=False.
    @torch.jit.unused
    def _set_aux_loss(self, outputs_class: Tensor, outputs_coord: Tensor):
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]


class PostProcess(nn.Module):
    """Model outputs -> per image {'scores' [Q], 'labels' [Q], 'boxes' [Q,4] absolute xyxy}."""

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """target_sizes [B, 2] = (height, width) of each image in pixels."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"PostProcess: target_sizes must be [{len(logits)}, 2] (h, w), "
                             f"got {list(target_sizes.shape)}")
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes)
        boxes = box_cxcywh_to_xyxy(boxes) * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


def _num_classes(args) -> int:
    num_classes = getattr(args, "num_classes", None)
    if num_classes is not None:
        return int(num_classes)
    dataset = getattr(args, "dataset_file", "coco")
    if dataset == "coco":
        return 91
    if dataset == "coco_panoptic":
        return 250
    raise ValueError(f"num_classes is not set for --dataset_file {dataset}: pass --num_classes "
                     "(the largest category id + 1)")


def _weight_dict(args) -> Dict[str, float]:
    weights = {"loss_ce": 1, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.masks:
        weights["loss_mask"] = args.mask_loss_coef
        weights["loss_dice"] = args.dice_loss_coef
    if args.aux_loss:
        aux = {}
        for i in range(args.dec_layers - 1):
            aux.update({f"{k}_{i}": v for k, v in weights.items()})
        weights.update(aux)
    return weights


def _thing_map(args, num_classes: int) -> Dict[int, bool]:
    thing_ids = getattr(args, "thing_ids", None)
    if thing_ids is None:
        return {i: i <= 90 for i in range(num_classes + 1)}
    things = set(int(i) for i in thing_ids)
    return {i: i in things for i in range(num_classes + 1)}


def build(args):
    """main.py's args -> (model, criterion, postprocessors); see docs/internals.md for the args read."""
    from models.segmentation import DETRsegm, PostProcessPanoptic, PostProcessSegm

    num_classes = _num_classes(args)
    if getattr(args, "frozen_weights", None) is not None and not args.masks:
        raise ValueError("--frozen_weights trains only the mask head: add --masks")
    group_detr = getattr(args, "group_detr", 1)
    model = DETR(build_backbone(args), build_transformer(args), num_classes=num_classes,
                 num_queries=args.num_queries, aux_loss=args.aux_loss, group_detr=group_detr)
    if args.masks:
        model = DETRsegm(model, freeze_detr=getattr(args, "frozen_weights", None) is not None)
    losses = ["labels", "boxes", "cardinality"] + (["masks"] if args.masks else [])
    criterion = SetCriterion(num_classes, matcher=build_matcher(args), weight_dict=_weight_dict(args),
                             eos_coef=args.eos_coef, losses=losses,
                             mask_loss_on_padding=getattr(args, "mask_loss_on_padding", False),
                             num_queries=args.num_queries, group_detr=group_detr)
    criterion.to(torch.device(getattr(args, "device", "cpu")))
    postprocessors = {"bbox": PostProcess()}
    if args.masks:
        postprocessors["segm"] = PostProcessSegm()
        if getattr(args, "dataset_file", "coco") in ("coco_panoptic", "shapes_panoptic"):
            postprocessors["panoptic"] = PostProcessPanoptic(_thing_map(args, num_classes), threshold=0.85)
    return model, criterion, postprocessors
