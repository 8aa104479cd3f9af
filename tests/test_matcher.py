"""Hungarian matcher: hand-computed costs and assignments, empty targets, clear errors."""
import pytest
import torch

import models.matcher as matcher_module
from models.matcher import HungarianMatcher
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def _outputs(logits, boxes):
    return {"pred_logits": torch.tensor(logits, dtype=torch.float32)[None],
            "pred_boxes": torch.tensor(boxes, dtype=torch.float32)[None]}


def test_class_cost_alone_picks_the_likely_class():
    # Query 0 is confident in class 2, query 1 in class 1; targets are [1, 2].
    out = _outputs([[0.0, 0.0, 5.0, 0.0], [0.0, 5.0, 0.0, 0.0]], [[0.5, 0.5, 0.2, 0.2]] * 2)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)}]
    (rows, cols), = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0)(out, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64


def test_l1_cost_finds_the_optimum_not_the_greedy_pair():
    # cx of queries 0.1, 0.4, 0.9 vs targets 0.3, 0.5: L1 costs [[.2, .4], [.1, .1], [.6, .4]].
    # Optimum q0->t0, q1->t1 (total 0.3); greedy would start with q1 and end at 0.5.
    boxes = [[0.1, 0.5, 0.1, 0.1], [0.4, 0.5, 0.1, 0.1], [0.9, 0.5, 0.1, 0.1]]
    out = _outputs([[0.0, 0.0]] * 3, boxes)
    targets = [{"labels": torch.tensor([0, 0]), "boxes": torch.tensor([[0.3, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]])}]
    (rows, cols), = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0)(out, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]


def test_cost_matrix_is_the_weighted_sum(monkeypatch):
    seen = []
    real = matcher_module.linear_sum_assignment
    monkeypatch.setattr(matcher_module, "linear_sum_assignment", lambda c: (seen.append(c), real(c))[1])
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 3)
    boxes = torch.rand(1, 4, 4) * 0.4 + 0.1
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.2, 0.3, 0.1, 0.1]])}]
    HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    prob = logits[0].softmax(-1)
    tb = targets[0]["boxes"]
    expected = torch.zeros(4, 2)
    for q in range(4):
        for t in range(2):
            l1 = (boxes[0, q] - tb[t]).abs().sum()
            giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes[0, q:q + 1]), box_cxcywh_to_xyxy(tb[t:t + 1]))[0, 0]
            expected[q, t] = 5 * l1 - prob[q, targets[0]["labels"][t]] - 2 * giou
    assert torch.allclose(torch.as_tensor(seen[0]), expected, atol=1e-5)


def test_images_are_matched_independently_and_empty_targets_work():
    torch.manual_seed(1)
    out = {"pred_logits": torch.randn(3, 6, 5), "pred_boxes": torch.rand(3, 6, 4) * 0.4 + 0.1}
    targets = [{"labels": torch.tensor([1, 3, 2]), "boxes": torch.rand(3, 4) * 0.4 + 0.1},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    matcher = HungarianMatcher(1, 5, 2)
    batch = matcher(out, targets)
    for i in range(3):
        alone = matcher({k: v[i:i + 1] for k, v in out.items()}, [targets[i]])[0]
        assert torch.equal(batch[i][0], alone[0]) and torch.equal(batch[i][1], alone[1])
    assert len(batch[0][0]) == 3 and batch[0][0].tolist() == sorted(batch[0][0].tolist())
    assert batch[1][0].numel() == 0 and batch[1][0].dtype == torch.int64 and batch[1][1].dtype == torch.int64


def test_non_finite_predictions_name_the_culprit():
    out = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    out["pred_boxes"][0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="pred_boxes contains NaN/inf"):
        HungarianMatcher()(out, targets)
    out["pred_boxes"][0, 1, 0] = 0.5
    out["pred_logits"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="pred_logits contains NaN/inf"):
        HungarianMatcher()(out, targets)


def test_label_out_of_range_is_named():
    out = {"pred_logits": torch.zeros(1, 2, 7), "pred_boxes": torch.full((1, 2, 4), 0.5)}  # 6 classes + no-object
    targets = [{"labels": torch.tensor([2, 6]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)}]
    with pytest.raises(ValueError, match=r"label 6 .*num_classes=6"):
        HungarianMatcher()(out, targets)


def test_negative_target_size_is_refused():
    out = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, -0.2, 0.2]])}]
    with pytest.raises(ValueError, match="negative width or height"):
        HungarianMatcher()(out, targets)
