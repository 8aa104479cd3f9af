"""--lr_schedule: step stays the original's per-epoch StepLR; cosine warms up linearly and decays to 0
per iteration, and resumes where it stopped."""
import argparse
import math

import pytest
import torch

import main


def _args(*flags: str) -> argparse.Namespace:
    return main.get_args_parser().parse_args(["--lr", "1e-3", *flags])


def _optimizer() -> torch.optim.Optimizer:
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [w]}, {"params": [b], "lr": 1e-4}], lr=1e-3)


def _lrs(scheduler, optimizer, steps: int) -> list:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_step_schedule_is_the_original_steplr():
    opt = _optimizer()
    sched = main._make_lr_scheduler(_args("--lr_drop", "3", "--epochs", "6"), opt, steps_per_epoch=100)
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and sched.step_size == 3


def test_cosine_warms_up_then_decays_to_zero_for_every_group():
    opt = _optimizer()
    args = _args("--lr_schedule", "cosine", "--warmup_epochs", "1", "--epochs", "4")
    sched = main._make_lr_scheduler(args, opt, steps_per_epoch=10)
    lrs = _lrs(sched, opt, 40)
    main_lr = [lr[0] for lr in lrs]
    assert main_lr[0] == pytest.approx(1e-3 * 0.1 * 0.5 * (1 + math.cos(0)))  # step 0: 1/10 of the ramp
    assert all(a < b for a, b in zip(main_lr[:9], main_lr[1:10]))  # rising during the warm-up epoch
    expected_10 = 1e-3 * 0.5 * (1 + math.cos(math.pi * 10 / 40))
    assert main_lr[10] == pytest.approx(expected_10)
    assert all(a > b for a, b in zip(main_lr[10:39], main_lr[11:40]))  # then falling
    assert main_lr[-1] < 1e-3 * 0.01
    assert [lr[1] / lr[0] for lr in lrs] == pytest.approx([0.1] * 40)  # the backbone group keeps its ratio


def test_cosine_resumes_from_its_state():
    args = _args("--lr_schedule", "cosine", "--warmup_epochs", "0.5", "--epochs", "3")
    opt = _optimizer()
    sched = main._make_lr_scheduler(args, opt, steps_per_epoch=8)
    full = _lrs(sched, opt, 24)
    opt2 = _optimizer()
    first = main._make_lr_scheduler(args, opt2, steps_per_epoch=8)
    _lrs(first, opt2, 10)
    state_opt, state_sched = opt2.state_dict(), first.state_dict()
    opt3 = _optimizer()
    resumed = main._make_lr_scheduler(args, opt3, steps_per_epoch=8)
    opt3.load_state_dict(state_opt)
    resumed.load_state_dict(state_sched)
    assert [lr for pair in _lrs(resumed, opt3, 14) for lr in pair] == pytest.approx([lr for pair in full[10:] for lr in pair])


def test_warmup_needs_the_cosine_schedule():
    with pytest.raises(ValueError, match="--warmup_epochs needs --lr_schedule cosine"):
        main._make_lr_scheduler(_args("--warmup_epochs", "1"), _optimizer(), steps_per_epoch=10)
