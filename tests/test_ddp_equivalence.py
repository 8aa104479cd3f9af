"""One DDP step on 2 gloo processes with batch b each == one single-process step with batch 2b.

Dropout 0, frozen BatchNorm (no batch statistics), images of one size (same padding), fixed
targets, and the same number of target boxes on each process (the weighted cross-entropy is
normalised per process; the box losses by the all-reduced box count). Compared: the loss
(averaged over processes), every gradient after DDP's averaging, and every weight after the
AdamW step with the clipping of main.py. Run for the original DETR and for Group DETR
(--group_detr 3: each process matches its own images once per group).
"""
import argparse
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from util import distributed as du

B = 2  # images per process
NUM_CLASSES = 5
BOXES_PER_IMAGE = (2, 1)  # image i holds BOXES_PER_IMAGE[i % 2] boxes: 3 per process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(group_detr: int = 1) -> argparse.Namespace:
    import main

    flags = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "checkpoint",
             "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1",
             "--dec_layers", "2", "--num_queries", "6", "--dropout", "0", "--dataset_file", "shapes",
             "--num_classes", str(NUM_CLASSES), "--group_detr", str(group_detr)]
    args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(flags)
    args.thing_ids = None
    return args


def _batch() -> tuple[list[torch.Tensor], list[dict]]:
    """2B images [3,64,96] and targets (labels, normalised cxcywh boxes), the same on every process."""
    g = torch.Generator().manual_seed(7)
    images = [torch.randn(3, 64, 96, generator=g) for _ in range(2 * B)]
    targets = []
    for i in range(2 * B):
        n = BOXES_PER_IMAGE[i % 2]
        centres = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        sizes = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        targets.append({"labels": torch.randint(1, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.cat([centres, sizes], dim=1)})
    return images, targets


def _step(model, criterion, images, targets, args) -> dict:
    """main.py's training step: weighted loss, backward, clip, AdamW with the backbone group."""
    net = model.module if hasattr(model, "module") else model
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if "backbone" not in n]},
         {"params": [p for n, p in named if "backbone" in n], "lr": args.lr_backbone}],
        lr=args.lr, weight_decay=args.weight_decay)
    loss_dict = criterion(model(images), targets)
    loss = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items() if k in loss_dict)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in named}
    torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_max_norm)
    optimizer.step()
    mean_loss = du.reduce_dict({"loss": loss.detach()})["loss"]
    return {"loss": mean_loss, "grads": grads, "weights": {n: p.detach().clone() for n, p in net.state_dict().items()}}


def _build(args):
    from models import build_model

    torch.manual_seed(0)  # the same initial weights on every process
    model, criterion, _ = build_model(args)
    model.train()
    criterion.train()
    return model, criterion


def _ddp_worker(rank: int, port: int, out_path: str, group_detr: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = _args(group_detr)
    du.init_distributed_mode(args)
    model, criterion = _build(args)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, targets = _batch()
    part = slice(rank * B, (rank + 1) * B)
    result = _step(ddp, criterion, images[part], targets[part], args)
    if rank == 0:
        torch.save(result, out_path)
    du.cleanup()


@pytest.fixture(scope="module", params=[1, 3], ids=["detr", "group_detr3"])
def ddp_and_single(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    mp.spawn(_ddp_worker, args=(_free_port(), str(out), request.param), nprocs=2, join=True)
    args = _args(request.param)
    model, criterion = _build(args)
    images, targets = _batch()
    single = _step(model, criterion, images, targets, args)
    single["group_detr"] = request.param
    return torch.load(out, weights_only=True), single


def test_same_loss(ddp_and_single):
    ddp, single = ddp_and_single
    torch.testing.assert_close(ddp["loss"], single["loss"], rtol=0, atol=1e-5)


def test_same_gradients(ddp_and_single):
    ddp, single = ddp_and_single
    assert ddp["grads"].keys() == single["grads"].keys()
    assert any("backbone" in n for n in single["grads"])  # the backbone trains too
    for name, grad in single["grads"].items():
        # Summation order differs (per process, then averaged): compare against the tensor's scale.
        # (Some are exactly 0: the first decoder layer's self-attention sees a zero target.)
        scale = grad.abs().max().item()
        assert (ddp["grads"][name] - grad).abs().max().item() <= 1e-5 * scale, name


def test_same_updated_weights(ddp_and_single):
    ddp, single = ddp_and_single
    changed = 0
    for name, weight in single["weights"].items():
        torch.testing.assert_close(ddp["weights"][name], weight, rtol=0, atol=1e-5, msg=name)
        changed += int(not torch.equal(weight, _initial_weights(single["group_detr"])[name]))
    assert changed > 10  # the step did move the weights
    if single["group_detr"] > 1:  # the extra query groups are trained too
        assert not torch.equal(single["weights"]["group_query_embed.weight"],
                               _initial_weights(single["group_detr"])["group_query_embed.weight"])


_INITIAL: dict = {}


def _initial_weights(group_detr: int) -> dict:
    if group_detr not in _INITIAL:
        model, _ = _build(_args(group_detr))
        _INITIAL[group_detr] = {n: p.detach().clone() for n, p in model.state_dict().items()}
    return _INITIAL[group_detr]
