"""Group DETR (--group_detr K): group isolation, per-group matching, the loss normalisation, and
that a K > 1 checkpoint is an ordinary DETR checkpoint at inference (hub, --eval, --finetune)."""
import argparse
import hashlib

import pytest
import torch

import hubconf
import main
from models import build_model
from models.matcher import HungarianMatcher
from util.checkpoint import CheckpointError, load_checkpoint, load_model_state
from util.flag_types import parse_flags

NUM_CLASSES = 5
Q = 6


def _args(group_detr: int = 1, *extra: str) -> argparse.Namespace:
    flags = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
             "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2",
             "--num_queries", str(Q), "--dropout", "0", "--dataset_file", "shapes",
             "--num_classes", str(NUM_CLASSES), "--group_detr", str(group_detr), *extra]
    args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(flags)
    args.thing_ids = None
    return args


def _build(group_detr: int, *extra: str):
    torch.manual_seed(0)
    return build_model(_args(group_detr, *extra))


def _batch(n_images: int = 2):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(n_images, 3, 64, 80, generator=g)
    targets = []
    for i in range(n_images):
        n = 1 + i % 3
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=g),
                                            0.1 + 0.2 * torch.rand(n, 2, generator=g)], 1)})
    return images, targets


def test_train_mode_runs_every_group_and_eval_mode_only_group_0():
    model, _, _ = _build(3)
    images, _ = _batch()
    assert model.group_query_embed.weight.shape == (2 * Q, 32)
    model.train()
    out = model(images)
    assert out["pred_logits"].shape == (2, 3 * Q, NUM_CLASSES + 1)
    assert all(a["pred_boxes"].shape == (2, 3 * Q, 4) for a in out["aux_outputs"])
    model.eval()
    assert model(images)["pred_logits"].shape == (2, Q, NUM_CLASSES + 1)


def test_groups_do_not_see_each_other():
    """Changing group 2's queries leaves groups 0 and 1 unchanged (train mode, every decoder layer)."""
    model, _, _ = _build(3)
    model.train()
    images, _ = _batch()
    with torch.no_grad():
        before = model(images)
        model.group_query_embed.weight[Q:] += torch.randn(Q, 32)  # group 2 = rows Q..2Q-1 of the extra groups
        after = model(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(after[key][:, :2 * Q], before[key][:, :2 * Q], rtol=0, atol=0)
        assert not torch.allclose(after[key][:, 2 * Q:], before[key][:, 2 * Q:])  # group 2 itself did change
    for a, b in zip(after["aux_outputs"], before["aux_outputs"]):
        torch.testing.assert_close(a["pred_logits"][:, :2 * Q], b["pred_logits"][:, :2 * Q], rtol=0, atol=0)


def test_group_0_in_train_mode_equals_the_plain_model():
    """With dropout 0, group 0 of a K=3 model computes exactly what the K=1 model computes."""
    grouped, _, _ = _build(3)
    plain, _, _ = _build(1)
    load_model_state(plain, grouped.state_dict())
    grouped.train()
    plain.train()
    images, _ = _batch()
    with torch.no_grad():
        g, p = grouped(images), plain(images)
    torch.testing.assert_close(g["pred_logits"][:, :Q], p["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g["pred_boxes"][:, :Q], p["pred_boxes"], rtol=1e-5, atol=1e-5)


def test_each_target_is_matched_once_per_group():
    torch.manual_seed(1)
    k, b = 4, 3
    outputs = {"pred_logits": torch.randn(b, k * Q, NUM_CLASSES + 1), "pred_boxes": torch.rand(b, k * Q, 4)}
    _, targets = _batch(b)
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    indices = matcher(outputs, targets, num_groups=k)
    for i, (src, tgt) in enumerate(indices):
        n = len(targets[i]["labels"])
        assert len(src) == len(tgt) == k * n
        for g in range(k):
            in_group = (src >= g * Q) & (src < (g + 1) * Q)
            assert sorted(tgt[in_group].tolist()) == list(range(n))  # every target exactly once in group g
    # and each group's assignment is the one-group assignment of that group's slice
    for g in range(k):
        part = {key: v[:, g * Q:(g + 1) * Q] for key, v in outputs.items()}
        for (src, tgt), (gs, gt) in zip(indices, matcher(part, targets)):
            in_group = (src >= g * Q) & (src < (g + 1) * Q)
            assert torch.equal(src[in_group] - g * Q, gs) and torch.equal(tgt[in_group], gt)


def test_identical_groups_give_exactly_the_one_group_loss():
    """The loss is the mean over groups: K copies of group 0's queries give the K=1 loss, every term."""
    grouped, grouped_criterion, _ = _build(3)
    plain, plain_criterion, _ = _build(1)
    with torch.no_grad():
        grouped.group_query_embed.weight.copy_(grouped.query_embed.weight.repeat(2, 1))
    load_model_state(plain, grouped.state_dict())
    for m in (grouped, plain, grouped_criterion, plain_criterion):
        m.train()
    images, targets = _batch()
    grouped_losses = grouped_criterion(grouped(images), targets)
    plain_losses = plain_criterion(plain(images), targets)
    assert grouped_losses.keys() == plain_losses.keys()
    for key, value in plain_losses.items():
        torch.testing.assert_close(grouped_losses[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_different_groups_give_the_mean_of_their_losses():
    grouped, criterion, _ = _build(2)
    grouped.train()
    images, targets = _batch()
    with torch.no_grad():
        out = grouped(images)
    total = criterion(out, targets)
    one_group = build_model(_args(1))[1]
    per_group = [one_group({"pred_logits": out["pred_logits"][:, g * Q:(g + 1) * Q],
                            "pred_boxes": out["pred_boxes"][:, g * Q:(g + 1) * Q]}, targets) for g in range(2)]
    for key in ("loss_bbox", "loss_giou", "loss_ce"):
        # loss_ce: a weighted mean over all 2Q queries; with 2 groups of the same size and targets it is the mean
        torch.testing.assert_close(total[key], (per_group[0][key] + per_group[1][key]) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total["cardinality_error"], per_group[0]["cardinality_error"])  # group 0's


def test_masks_on_group_0_only():
    model, criterion, _ = _build(2, "--masks", "--hidden_dim", "128", "--nheads", "8")
    model.train()
    criterion.train()
    images, targets = _batch()
    for t in targets:
        t["masks"] = torch.rand(len(t["labels"]), 64, 80) > 0.5
    out = model(images)
    assert out["pred_logits"].shape[1] == 2 * Q and out["pred_masks"].shape[1] == Q
    losses = criterion(out, targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    assert model.mask_head.out_lay.weight.grad.abs().sum() > 0
    assert model.detr.group_query_embed.weight.grad.abs().sum() > 0


def test_grouped_checkpoint_loads_into_the_plain_hub_model(tmp_path, capsys):
    """A checkpoint trained with --group_detr 3 (hub architecture: R50, 6+6 layers, 100 queries)
    loads into hubconf's plain model through its release loader, which is strict except for the
    training-only groups, and gives the training model's eval-mode outputs."""
    args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(
        ["--device", "cpu", "--backbone_weights", "checkpoint", "--num_classes", "91", "--group_detr", "3"])
    torch.manual_seed(0)
    trained, _, _ = build_model(args)
    path = tmp_path / "grouped.pth"
    torch.save({"model": trained.state_dict(), "args": args}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    named = tmp_path / f"detr-r50-{digest}.pth"
    path.rename(named)
    hub_model = hubconf._make_detr("resnet50", num_classes=91)
    checkpoint = load_checkpoint(named.as_uri())
    load_model_state(hub_model, checkpoint["model"], what="grouped checkpoint")
    assert "left out group_query_embed.weight" in capsys.readouterr().out
    assert "group_query_embed.weight" not in hub_model.state_dict()
    trained.eval()
    hub_model.eval()
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        a, b = trained(images), hub_model(images)
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"], rtol=0, atol=0)


def test_a_plain_checkpoint_still_refuses_unknown_keys():
    model, _, _ = _build(1)
    state = dict(model.state_dict())
    state["something_else.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="something_else"):
        load_model_state(model, state)


def test_group_detr_below_one_is_refused():
    with pytest.raises(SystemExit, match="--group_detr: must be an integer >= 1, got 0"):
        parse_flags(main.get_args_parser(), ["--group_detr", "0"])  # on the command line
    args = _args(1)
    args.group_detr = 0
    with pytest.raises(ValueError, match="--group_detr"):  # and by the model builder, for other callers
        build_model(args)
