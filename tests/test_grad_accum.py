"""--grad_accum_steps N: N micro-batches of b images give the gradients of one batch of N*b.

What is equal, exactly: the box losses (L1, GIoU; masks likewise) are normalised by the boxes of
the whole accumulated batch, averaged over processes (engine.accumulated_num_boxes), so they
match one big batch whatever each micro-batch holds. The classification loss, a weighted mean
(weight eos_coef on "no object", 1 elsewhere), is normalised by the class-weight sum of the whole
accumulated batch on this process (SetCriterion.class_weight_sum), so it matches too, whatever the
box counts. (Across processes the CE stays a per-process mean that DDP averages, as without
accumulation.) Up to float rounding (convolutions
sum over 1, 2 or 4 images), with dropout 0, frozen BatchNorm and images of one size (one padding).
The DDP case (2 gloo processes) also checks that gradients are all-reduced on the last
micro-batch only (`no_sync` before it).
"""
import argparse
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine import train_one_epoch
from util import distributed as du
from util.nested_tensor import nested_tensor_from_tensor_list

NUM_CLASSES = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(eos_coef: float) -> argparse.Namespace:
    import main

    flags = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "checkpoint",
             "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1",
             "--dec_layers", "2", "--num_queries", "6", "--dropout", "0", "--dataset_file", "shapes",
             "--num_classes", str(NUM_CLASSES), "--eos_coef", str(eos_coef)]
    args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(flags)
    args.thing_ids = None
    return args


def _build(args):
    from models import build_model

    torch.manual_seed(0)  # the same initial weights in every run and process
    model, criterion, _ = build_model(args)
    return model, criterion


def _data(boxes_per_image: list[int]) -> list[tuple[torch.Tensor, dict]]:
    """(image [3,64,96], target) per image; image i holds boxes_per_image[i] boxes."""
    g = torch.Generator().manual_seed(7)
    items = []
    for i, n in enumerate(boxes_per_image):
        centres = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        sizes = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        target = {"labels": torch.randint(1, NUM_CLASSES, (n,), generator=g),
                  "boxes": torch.cat([centres, sizes], dim=1), "image_id": torch.tensor([i])}
        items.append((torch.randn(3, 64, 96, generator=g), target))
    return items


def _batches(items, size):
    return [(nested_tensor_from_tensor_list([im for im, _ in items[i:i + size]]), [t for _, t in items[i:i + size]])
            for i in range(0, len(items), size)]


def _grads_after_one_step(model, criterion, batches, steps) -> dict[str, torch.Tensor]:
    # lr 0: the step leaves the weights, and the gradients it used stay in .grad
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_one_epoch(model, criterion, batches, optimizer, "cpu", 0, max_norm=0, print_freq=1000,
                    grad_accum_steps=steps)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    assert any("backbone" in n for n in expected)  # the backbone trains too
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        assert (actual[name] - grad).abs().max().item() <= rel * scale, name


def _naive_accumulation(model, criterion, batches) -> dict[str, torch.Tensor]:
    """Each micro-batch normalised by its own boxes (the mistake accumulation must avoid)."""
    model.train()
    for samples, targets in batches:
        loss_dict = criterion(model(samples), targets)
        loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
        (loss / len(batches)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("eos_coef, boxes", [(1.0, [3, 2, 1, 0]), (0.1, [2, 1, 1, 2]), (0.1, [3, 2, 1, 0])],
                         ids=["eos1_unequal_counts", "eos0.1_equal_counts", "eos0.1_unequal_counts"])
def test_two_micro_batches_equal_one_batch(eos_coef, boxes):
    args = _args(eos_coef)
    items = _data(boxes)
    whole = _grads_after_one_step(*_build(args), _batches(items, 4), steps=1)
    accumulated = _grads_after_one_step(*_build(args), _batches(items, 2), steps=2)
    _assert_close(accumulated, whole)
    if boxes[0] + boxes[1] != boxes[2] + boxes[3]:
        naive = _naive_accumulation(*_build(args), _batches(items, 2))
        worst = max((naive[n] - g).abs().max().item() / g.abs().max().item() for n, g in whole.items()
                    if g.abs().max() > 0)
        assert worst > 1e-2  # so the equality above depends on the whole-batch normalisation


def test_steps_per_epoch_and_short_last_group():
    """5 micro-batches with N=2: steps after micro-batches 2, 4 and 5 (the last group has one)."""
    args = _args(0.1)
    model, criterion = _build(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = []
    real_step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    stats = train_one_epoch(model, criterion, _batches(_data([1, 2, 1, 1, 2]), 1), optimizer, "cpu", 0,
                            print_freq=1000, grad_accum_steps=2)
    assert len(steps) == 3
    assert torch.isfinite(torch.tensor(stats["loss"]))
    with pytest.raises(ValueError, match="grad_accum_steps 0"):
        train_one_epoch(model, criterion, [], optimizer, "cpu", 0, grad_accum_steps=0)


# ---------------------------------------------------------------------------------------------
# DDP: 2 processes x 2 micro-batches of 1 image == 1 process, one batch of the 4 images.

DDP_BOXES = [3, 0, 1, 2]  # rank r gets images r and r + 2: 3+1 boxes on rank 0, 0+2 on rank 1


def _ddp_worker(rank: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = _args(1.0)
    du.init_distributed_mode(args)
    model, criterion = _build(args)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    entered = []
    real_no_sync = ddp.no_sync
    ddp.no_sync = lambda: (entered.append(1), real_no_sync())[1]
    items = _data(DDP_BOXES)
    mine = [items[rank], items[rank + 2]]
    grads = _grads_after_one_step(ddp, criterion, _batches(mine, 1), steps=2)
    if rank == 0:
        torch.save({"grads": {n.removeprefix("module."): g for n, g in grads.items()}, "no_sync": len(entered)},
                   out_path)
    du.cleanup()


def test_ddp_accumulation_equals_one_big_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert ddp["no_sync"] == 1  # the first of the 2 micro-batches ran without gradient sync
    args = _args(1.0)
    whole = _grads_after_one_step(*_build(args), _batches(_data(DDP_BOXES), 4), steps=1)
    _assert_close(ddp["grads"], whole)


def test_main_refuses_zero_steps_before_any_work(tmp_path, capsys):
    import main

    with pytest.raises(SystemExit) as exit_info:
        main.get_args_parser().parse_args(["--device", "cpu", "--dataset_file", "shapes", "--grad_accum_steps", "0",
                                           "--data_path", str(tmp_path / "shapes")])
    assert exit_info.value.code == 2
    assert "argument --grad_accum_steps: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "shapes").exists()
