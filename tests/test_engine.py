"""engine.train_one_epoch: weighted stats, clipping, the non-finite-loss stop; --eval_every via main.

The loop tests use a two-parameter toy model and criterion so every number is computed by hand;
the main.py tests run a tiny real model.
"""
import json
import math

import pytest
import torch

import main
from engine import NonFiniteLossError, train_one_epoch


class Toy(torch.nn.Module):
    """pred = w * x + b per image; the criterion's terms are plain functions of it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.b = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        return {"pred": self.w * x + self.b}


class ToyCriterion(torch.nn.Module):
    weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0}

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.calls = 0
        self.nan_at = nan_at

    def forward(self, outputs, targets):
        pred = outputs["pred"]
        ce = pred.mean()
        bbox = (pred ** 2).mean()
        if self.calls == self.nan_at:
            ce = ce * float("nan")
        self.calls += 1
        return {"loss_ce": ce, "loss_bbox": bbox, "class_error": torch.tensor(25.0 * self.calls)}


def _batches(values):
    return [(torch.tensor([v]), ({"image_id": torch.tensor([10 + i]), "labels": torch.tensor([1])},))
            for i, v in enumerate(values)]


def test_stats_are_weighted_epoch_averages():
    model, criterion = Toy(), ToyCriterion()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: losses known in advance
    stats = train_one_epoch(model, criterion, _batches([1.0, 2.0, 3.0]), optimizer, "cpu", epoch=0, print_freq=0)
    # pred = x: loss_ce = x, loss_bbox_unscaled = x^2, loss = x + 5 x^2
    assert stats["loss_ce"] == pytest.approx(2.0)
    assert stats["loss_bbox_unscaled"] == pytest.approx((1 + 4 + 9) / 3)
    assert stats["loss_bbox"] == pytest.approx(5 * 14 / 3)
    assert stats["loss"] == pytest.approx((6 + 22 + 48) / 3)
    assert stats["class_error"] == pytest.approx((25 + 50 + 75) / 3)
    assert stats["lr"] == 0.0
    assert set(stats) == {"loss", "loss_ce", "loss_bbox", "loss_ce_unscaled", "loss_bbox_unscaled",
                          "class_error_unscaled", "class_error", "lr"}


def test_gradient_clipping_limits_the_step():
    model, criterion = Toy(), ToyCriterion()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    # x = 3: d/dw (w x + b + 5 (w x + b)^2) = 3 + 30*3 = 93, d/db = 1 + 30 = 31: norm ~98 -> clipped to 0.1
    train_one_epoch(model, criterion, _batches([3.0]), optimizer, "cpu", epoch=0, max_norm=0.1, print_freq=0)
    step = torch.stack([1.0 - model.w.detach(), 0.0 - model.b.detach()])
    assert step.norm().item() == pytest.approx(0.1, rel=1e-5)
    assert (step[0] / step[1]).item() == pytest.approx(93 / 31, rel=1e-5)  # direction kept

    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_one_epoch(model, criterion, _batches([3.0]), optimizer, "cpu", epoch=0, max_norm=0, print_freq=0)
    assert model.w.item() == pytest.approx(1.0 - 93.0)  # max_norm 0: no clipping


def test_non_finite_loss_stops_before_the_step_with_details():
    model, criterion = Toy(), ToyCriterion(nan_at=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(model, criterion, _batches([1.0, 2.0, 3.0]), optimizer, "cpu", epoch=7, print_freq=0)
    message = str(info.value)
    assert "epoch 7" in message and "iteration 1" in message
    # every term with its value: after one step w = 0.89, b = -0.11, so pred(2) = 1.67, bbox = 1.67^2
    assert "loss_ce=nan" in message and "loss_bbox=2.7889" in message
    assert "[11]" in message  # the batch's image ids
    # exactly one step was taken (iteration 0: grad w = 1 + 10 = 11, b = 11), none with the NaN
    assert model.w.item() == pytest.approx(1.0 - 0.11)
    assert model.b.item() == pytest.approx(-0.11)
    assert all(math.isfinite(p.item()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# --eval_every through main.py


TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "8", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "4",
        "--shapes_val_size", "2", "--batch_size", "2", "--print_freq", "100"]


# every N: after epochs N-1, 2N-1, ... and after the last; 0: never
@pytest.mark.parametrize("every, evaluated", [(2, [False, True, True]), (0, [False])])
def test_eval_every(tmp_path, every, evaluated):
    out = tmp_path / "run"
    args = main.get_args_parser().parse_args(
        [*TINY, "--data_path", str(tmp_path / "shapes"), "--epochs", str(len(evaluated)), "--eval_every", str(every),
         "--output_dir", str(out)])
    main.main(args)
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(len(evaluated)))
    assert ["test_coco_eval_bbox" in line for line in lines] == evaluated
    assert (out / "eval" / "latest.pth").exists() == any(evaluated)
    assert not (out / "eval" / "000.pth").exists()  # epoch 0 was never evaluated here


def test_progress_lines_show_eta_meters_and_times(capsys):
    from util.metric_logger import MetricLogger

    logger = MetricLogger()
    for value in logger.log_every([1.0, 2.0, 3.0, 4.0, 5.0], print_freq=2, header="Epoch: [3]"):
        logger.update(loss=value)
    lines = capsys.readouterr().out.splitlines()
    # printed at iterations 0, 2 and the last (4), then the total
    assert [line.split("]  [")[1].split("]")[0] for line in lines[:3]] == ["0/5", "2/5", "4/5"]
    assert all("eta: 0:00:00" in line and "time: " in line and "data: " in line for line in lines[:3])
    assert "loss: 3.0000 (3.0000)" in lines[2]  # window median (global average)
    assert lines[3].startswith("Epoch: [3] Total time: ")
    assert logger.meters["loss"].global_avg == 3.0


class AuxCriterion(ToyCriterion):
    """The real criterion's term names: main terms, an auxiliary copy, class_error."""
    weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_ce_0": 1.0}

    def forward(self, outputs, targets):
        terms = super().forward(outputs, targets)
        return {**terms, "loss_giou": terms["loss_bbox"] / 2, "loss_ce_0": terms["loss_ce"] * 2}


def _progress_meters(out: str) -> list[list[str]]:
    """Names on each training progress line ('Epoch: [0]  [i/n]  name: value  ...')."""
    lines = [line for line in out.splitlines() if line.startswith("Epoch: [0]  [")]
    return [[part.split(":")[0] for part in line.split("  ")[2:]] for line in lines]


def test_console_progress_line_shows_the_main_terms_and_stats_keep_all(capsys):
    model, criterion = Toy(), AuxCriterion()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train_one_epoch(model, criterion, _batches([1.0, 2.0]), optimizer, "cpu", epoch=0, print_freq=1)
    out = capsys.readouterr().out
    assert _progress_meters(out) == [["eta", "loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "lr",
                                      "time"]] * 2
    averaged = next(line for line in out.splitlines() if line.startswith("Averaged stats:"))
    assert "loss_ce_0" not in averaged and "_unscaled" not in averaged and "loss_giou: " in averaged
    # what log.txt receives: every term, auxiliary and unscaled included
    assert {"loss_ce_0", "loss_ce_0_unscaled", "loss_giou_unscaled", "class_error_unscaled"} <= set(stats)
    # pred = x: ce + 5 bbox + 2 giou + ce_0 = x + 5 x^2 + x^2 + 2 x, at x = 1 and 2
    assert stats["loss"] == pytest.approx((9 + 30) / 2)


def test_print_all_shows_every_term_as_the_original(capsys):
    model, criterion = Toy(), AuxCriterion()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_one_epoch(model, criterion, _batches([1.0, 2.0]), optimizer, "cpu", epoch=0, print_freq=1, print_all=True)
    meters = _progress_meters(capsys.readouterr().out)
    assert len(meters) == 2
    assert {"loss_ce_0", "loss_ce_0_unscaled", "loss_bbox_unscaled", "data"} <= set(meters[0])
