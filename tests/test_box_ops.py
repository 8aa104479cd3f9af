"""Box conversions and (generalised) IoU against hand-computed values."""
import pytest
import torch

from util.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, elementwise_generalized_box_iou,
                          generalized_box_iou, masks_to_boxes)


def test_conversions_by_hand_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [3.0, 2.0, 2.0, 4.0]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [2.0, 0.0, 4.0, 4.0]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)


def test_iou_and_union_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]])
    iou, union = box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 1.0]]))
    assert torch.allclose(union, torch.tensor([[7.0, 4.0]]))


def test_generalized_iou_by_hand():
    # Overlapping: inter 1, union 7, hull 9 -> 1/7 - 2/9; disjoint: inter 0, union 2, hull 3 -> -1/3.
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    giou = generalized_box_iou(a, b)
    assert giou.shape == (2, 2)
    assert giou[0, 0].item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-6)
    assert giou[1, 1].item() == pytest.approx(-1 / 3, abs=1e-6)
    assert torch.allclose(elementwise_generalized_box_iou(a, b), giou.diag())
    assert torch.allclose(generalized_box_iou(a, a).diag(), torch.ones(2))


def test_generalized_iou_refuses_inverted_boxes():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="boxes2 has x1 < x0"):
        generalized_box_iou(good, bad)


def test_masks_to_boxes():
    masks = torch.zeros(2, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4, 0] = True
    assert masks_to_boxes(masks).tolist() == [[2.0, 1.0, 4.0, 2.0], [0.0, 4.0, 0.0, 4.0]]
    assert masks_to_boxes(torch.zeros(0, 5, 6)).shape == (0, 4)
