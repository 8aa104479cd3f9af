"""--dense_aux: the encoder tokens' one-to-many assignment, its losses, and that the head is
training-only (eval outputs and checkpoints for plain models unchanged)."""
import argparse

import torch

import main
from models import build_model
from models.dense_aux import assign, cell_centres, dense_losses
from util.checkpoint import load_model_state


def test_cell_centres_are_in_each_images_unpadded_frame():
    mask = torch.zeros(2, 2, 4, dtype=torch.bool)
    mask[1, :, 2:] = True  # image 1 is 2 cells wide, padded to 4
    c = cell_centres(mask).view(2, 2, 4, 2)
    torch.testing.assert_close(c[0, 0, :, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    torch.testing.assert_close(c[0, :, 0, 1], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(c[1, 0, :2, 0], torch.tensor([0.25, 0.75]))


def test_assignment_contains_centre_smallest_box_wins_and_small_boxes_get_their_centre_cell():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    centres = cell_centres(mask)
    valid = ~mask.flatten(1)
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0],      # the whole image: every cell inside
                          [0.25, 0.25, 0.5, 0.5],    # the top-left quarter: 4 cells, smaller -> wins there
                          [0.86, 0.86, 0.02, 0.02]])  # tiny, contains no cell centre
    assigned = assign(centres, valid, [{"boxes": boxes, "labels": torch.tensor([0, 1, 2])}]).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[:2, :2] = 1
    expected[3, 3] = 2  # the cell nearest the tiny box's centre
    assert torch.equal(assigned, expected)


def test_padding_tokens_are_never_assigned_and_empty_images_are_all_background():
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, :, 1] = True
    assigned = assign(cell_centres(mask), ~mask.flatten(1),
                      [{"boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]), "labels": torch.tensor([1])},
                       {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert assigned.tolist() == [[0, -1, 0, -1], [-1, -1, -1, -1]]


def test_losses_on_a_perfect_prediction():
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    centres = cell_centres(mask)
    target = {"boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5]]), "labels": torch.tensor([1])}
    boxes = torch.rand(1, 4, 4)
    boxes[0, 0] = target["boxes"][0]
    logits = torch.full((1, 4, 3), -20.0)
    logits[0, 0, 1] = 20.0
    logits[0, 1:, 2] = 20.0  # no-object elsewhere
    losses = dense_losses({"pred_logits": logits, "pred_boxes": boxes, "centres": centres,
                           "valid": ~mask.flatten(1)}, [target], torch.tensor([1.0, 1.0, 0.1]))
    assert losses["loss_ce_dense"] < 1e-6
    assert losses["loss_bbox_dense"] < 1e-6 and losses["loss_giou_dense"] < 1e-6


def _args(*extra: str) -> argparse.Namespace:
    flags = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
             "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1",
             "--num_queries", "5", "--dropout", "0", "--dataset_file", "shapes", "--num_classes", "4", *extra]
    args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(flags)
    args.thing_ids = None
    return args


def test_head_trains_the_encoder_and_is_absent_at_inference(capsys):
    torch.manual_seed(0)
    model, criterion, _ = build_model(_args("--dense_aux", "2", "--group_detr", "2"))
    images = torch.randn(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[0.4, 0.5, 0.3, 0.2]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[0.6, 0.3, 0.2, 0.4], [0.2, 0.7, 0.2, 0.2]]), "labels": torch.tensor([1, 3])}]
    model.train()
    losses = criterion(model(images), targets)
    assert {"loss_ce_dense", "loss_bbox_dense", "loss_giou_dense"} <= losses.keys()
    assert criterion.weight_dict["loss_bbox_dense"] == 2 * 5 and criterion.weight_dict["loss_giou_dense"] == 2 * 2
    model.zero_grad()
    losses["loss_ce_dense"].backward()  # the dense loss alone reaches the encoder and the backbone
    assert model.transformer.encoder.layers[0].linear1.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.backbone.named_parameters())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert "dense_outputs" not in out
    plain, _, _ = build_model(_args())
    load_model_state(plain, model.state_dict(), what="dense checkpoint")
    assert "left out dense_aux_head.*" in capsys.readouterr().out
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(images)["pred_logits"], out["pred_logits"], rtol=0, atol=0)
