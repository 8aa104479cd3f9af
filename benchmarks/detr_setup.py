"""The models, targets and optimiser the benchmarks run, from the public constructors: detr_resnet50 as
released (ResNet-50, hidden 256, 6+6 layers, 100 queries, 91 classes) with random weights (the speed does
not depend on them), or --quick's tiny model of the same structure (resnet18, hidden 32, 1+1 layers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.backbone import Backbone, Joiner
from models.detr import DETR
from models.position_encoding import PositionEmbeddingSine
from models.transformer import Transformer


@dataclass(frozen=True)
class DetrShape:
    backbone: str
    hidden_dim: int
    nheads: int
    enc_layers: int
    dec_layers: int
    dim_feedforward: int
    num_queries: int
    num_classes: int
    image_hw: tuple[int, int]


FULL = DetrShape("resnet50", 256, 8, 6, 6, 2048, 100, 91, (800, 1066))
QUICK = DetrShape("resnet18", 32, 2, 1, 1, 64, 5, 5, (64, 96))


def build_detr(shape: DetrShape, aux_loss: bool, seed: int = 0) -> DETR:
    """A randomly initialised DETR of the given shape (deterministic for a seed); nothing downloaded."""
    torch.manual_seed(seed)
    backbone = Backbone(shape.backbone, True, False, False)
    joiner = Joiner(backbone, PositionEmbeddingSine(shape.hidden_dim // 2, normalize=True))
    transformer = Transformer(d_model=shape.hidden_dim, nhead=shape.nheads, num_encoder_layers=shape.enc_layers,
                              num_decoder_layers=shape.dec_layers, dim_feedforward=shape.dim_feedforward,
                              dropout=0.1, normalize_before=False, return_intermediate_dec=True)
    return DETR(joiner, transformer, num_classes=shape.num_classes, num_queries=shape.num_queries, aux_loss=aux_loss)


def random_images(shape: DetrShape, batch: int, seed: int = 1) -> torch.Tensor:
    """A normalised-looking image batch [batch, 3, H, W] (standard normal values)."""
    generator = torch.Generator().manual_seed(seed)
    h, w = shape.image_hw
    return torch.randn(batch, 3, h, w, generator=generator)


def random_targets(shape: DetrShape, batch: int, boxes_per_image: int = 7, seed: int = 2) -> list[dict]:
    """Targets as the criterion takes them: labels [N] int64, boxes [N,4] normalised cxcywh."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        centres = 0.2 + 0.6 * torch.rand(boxes_per_image, 2, generator=generator)
        sizes = 0.05 + 0.3 * torch.rand(boxes_per_image, 2, generator=generator)
        labels = torch.randint(1, shape.num_classes, (boxes_per_image,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], dim=1)})
    return targets


def build_criterion(shape: DetrShape) -> torch.nn.Module:
    """SetCriterion with the original's defaults: matcher costs 1/5/2, loss weights 1/5/2, eos 0.1, aux losses."""
    from models.criterion import SetCriterion
    from models.matcher import HungarianMatcher

    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    base = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    weight_dict = dict(base)
    for i in range(shape.dec_layers - 1):
        weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return SetCriterion(shape.num_classes, matcher, weight_dict, eos_coef=0.1,
                        losses=["labels", "boxes", "cardinality"])


def build_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW as main.py builds it: lr 1e-4, backbone lr 1e-5, weight decay 1e-4."""
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    return torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": 1e-5}],
                             lr=1e-4, weight_decay=1e-4)
