"""SetCriterion: each loss term against a hand computation, num_boxes normalisation, aux suffixes, masks."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.criterion import SetCriterion, _num_boxes
from models.detr import SetCriterion as ReExported
from models.matcher import HungarianMatcher


class FixedMatcher(nn.Module):
    """Returns the given indices, so the losses are checked apart from the assignment."""

    def __init__(self, indices):
        super().__init__()
        self.indices = [(torch.tensor(i, dtype=torch.int64), torch.tensor(j, dtype=torch.int64)) for i, j in indices]

    def forward(self, outputs, targets):
        return self.indices


def _case():
    """2 images, 3 queries, 3 classes (+ no-object = index 3); 2 + 1 targets -> num_boxes 3."""
    logits = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 3.0]],
                           [[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    # Query 0 of image 0 is the xyxy box (0, 0, .2, .2); its target is (.1, .1, .3, .3).
    boxes = torch.tensor([[[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]],
                          [[0.4, 0.6, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.6, 0.2, 0.2]])}]
    indices = [([0, 1], [0, 1]), ([0], [0])]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets, indices


def _criterion(indices, losses=("labels", "boxes", "cardinality"), eos_coef=0.1, **kw):
    return SetCriterion(3, FixedMatcher(indices), {"loss_ce": 1}, eos_coef, list(losses), **kw)


def test_losses_by_hand():
    outputs, targets, indices = _case()
    losses = _criterion(indices)(outputs, targets)
    # L1: image 0 query 0: |.1-.2|*2 + 0 + 0; query 1: 0; image 1 query 0: |.4-.5| = .1 -> .3 / 3 boxes.
    assert losses["loss_bbox"].item() == pytest.approx(0.3 / 3, abs=1e-6)
    # GIoU of (0,0,.2,.2) vs (.1,.1,.3,.3): 1/7 - 2/9; the other matched pairs... image 1: (.3,.5,.5,.7) vs (.4,.5,.6,.7)
    giou_a = 1 / 7 - 2 / 9
    giou_b = (0.1 * 0.2) / (0.04 + 0.04 - 0.02)  # hull = union here
    assert losses["loss_giou"].item() == pytest.approx(((1 - giou_a) + 0 + (1 - giou_b)) / 3, abs=1e-5)
    # Weighted cross-entropy: class per query (no-object = 3 for unmatched), weight 0.1 for no-object.
    classes = [[0, 2, 3], [1, 3, 3]]
    num, den = 0.0, 0.0
    for b in range(2):
        for q in range(3):
            c = classes[b][q]
            w = 0.1 if c == 3 else 1.0
            num += -w * torch.log_softmax(outputs["pred_logits"][b, q], -1)[c].item()
            den += w
    assert losses["loss_ce"].item() == pytest.approx(num / den, abs=1e-6)
    # Matched predictions: argmax 0 (ok), 2 (ok), 1 (ok) -> 0 % error.
    assert losses["class_error"].item() == pytest.approx(0.0)
    # Non-no-object argmax counts: image 0 -> 2 (targets 2), image 1 -> 3 (targets 1): mean |diff| = 1.
    assert losses["cardinality_error"].item() == pytest.approx(1.0)
    assert ReExported is SetCriterion


def test_num_boxes_normalisation_and_clamp():
    assert _num_boxes([{"labels": torch.zeros(2)}, {"labels": torch.zeros(1)}], torch.device("cpu")) == 3.0
    assert _num_boxes([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0
    outputs, targets, indices = _case()
    doubled = [dict(t) for t in targets] + [{"labels": torch.tensor([0, 0, 0]), "boxes": torch.rand(3, 4)}]
    crit = _criterion(indices + [([], [])])
    outputs3 = {k: torch.cat([v, v[:1]]) for k, v in outputs.items()}
    # Same matched pairs, but 6 target boxes in the batch: box losses halve.
    three = _criterion(indices)(outputs, targets)["loss_bbox"]
    six = crit(outputs3, doubled)["loss_bbox"]
    assert six.item() == pytest.approx(three.item() / 2, abs=1e-7)


def test_aux_outputs_get_suffixes_without_class_error():
    outputs, targets, indices = _case()
    outputs["aux_outputs"] = [{k: v * 0.5 for k, v in outputs.items()} for _ in range(2)]
    losses = _criterion(indices)(outputs, targets)
    for i in range(2):
        for key in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert f"{key}_{i}" in losses
        assert f"class_error_{i}" not in losses
    alone = _criterion(indices)(outputs["aux_outputs"][0], targets)
    assert losses["loss_bbox_0"].item() == pytest.approx(alone["loss_bbox"].item())


def test_empty_targets_and_bad_labels():
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 4, 4), "pred_boxes": torch.rand(1, 4, 4)}
    crit = SetCriterion(3, HungarianMatcher(1, 5, 2), {}, 0.1, ["labels", "boxes", "cardinality"])
    losses = crit(outputs, [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}])
    assert losses["loss_bbox"].item() == 0 and losses["class_error"].item() == 100
    assert math.isfinite(losses["loss_ce"].item())
    with pytest.raises(ValueError, match=r"image 0 .*label 3 .*num_classes=3"):
        crit(outputs, [{"labels": torch.tensor([3]), "boxes": torch.rand(1, 4)}])


def _focal(logit, target, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(logit)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)


def _mask_case():
    torch.manual_seed(0)
    pred = torch.randn(2, 2, 3, 4)  # [B, Q, h, w] logits, upsampled 2x to the 6x8 padded size
    big = (torch.rand(1, 6, 8) > 0.5).float()
    small = (torch.rand(1, 4, 6) > 0.5).float()  # image 1 is 4x6, padded to 6x8
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "masks": big},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "masks": small}]
    outputs = {"pred_logits": torch.zeros(2, 2, 4), "pred_boxes": torch.full((2, 2, 4), 0.5), "pred_masks": pred}
    return outputs, targets, [([1], [0]), ([0], [0])]


@pytest.mark.parametrize("on_padding", [True, False])
def test_mask_losses_by_hand(on_padding):
    outputs, targets, indices = _mask_case()
    losses = _criterion(indices, losses=["masks"], mask_loss_on_padding=on_padding)(outputs, targets)
    up = F.interpolate(outputs["pred_masks"], size=(6, 8), mode="bilinear", align_corners=False)
    focal, dice = 0.0, 0.0
    for b, q, (h, w) in [(0, 1, (6, 8)), (1, 0, (4, 6))]:
        target = torch.zeros(6, 8)
        target[: targets[b]["masks"].shape[1], : targets[b]["masks"].shape[2]] = targets[b]["masks"][0]
        logit = up[b, q]
        if not on_padding:
            logit, target = logit[:h, :w], target[:h, :w]
        focal += _focal(logit, target).mean()
        p = logit.sigmoid()
        dice += 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert losses["loss_mask"].item() == pytest.approx(focal.item() / 2, abs=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(dice.item() / 2, abs=1e-6)
