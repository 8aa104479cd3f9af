"""One training step of detr_resnet50 (forward, matcher, loss, backward, clipping, AdamW), batch 2, 800x1066.

Modes (each its own copy of the same initial weights, the same images and targets, interleaved):
  plain              the model as built (the reference)
  channels_last      fast.to_channels_last: weights and input in channels_last
  fast               fast.optimize_for_training (main.py's default); on the CPU its dropout draws the
                     dropped positions, other draws than torch's, so its first loss differs by the draws
  fast_torch_dropout the same with torch's dropout (main.py --no_sparse_dropout): the same first loss
  compile            torch.compile of the model (opt-in: --compile)
Prints median step time, speed-up, first loss (same seed) and its difference from plain's, peak RSS of a
step (VmHWM, reset before each step) and on CUDA the max allocated memory.

    python benchmarks/bench_train_step.py --threads 2
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch

from common import (base_parser, print_table, reset_peak_rss, rss_mb, setup, summarize, time_interleaved,
                    write_json)
from detr_setup import FULL, QUICK, build_criterion, build_detr, build_optimizer, random_images, random_targets
from fast import optimize_for_training, to_channels_last

CLIP_MAX_NORM = 0.1


def make_step(model: torch.nn.Module, criterion: torch.nn.Module, images: torch.Tensor, targets: list[dict],
              autocast_dtype: torch.dtype | None = None) -> Callable[[], None]:
    """A no-argument callable running one training step as main.py does; `step.record` keeps the losses,
    peak RSS (MiB) and CUDA max allocated (MiB) of every step. autocast_dtype: bf16 as engine.py's --amp."""
    optimizer = build_optimizer(model)
    device = images.device
    record: dict[str, list] = {"losses": [], "peak_rss_mb": [], "rss_before_mb": [], "cuda_max_allocated_mb": []}

    def step() -> None:
        if not record["losses"]:
            torch.manual_seed(0)  # the same dropout draws for every mode's first step
        record["rss_before_mb"].append(rss_mb("VmRSS"))
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with amp:
            loss_dict = criterion(model(images), targets)
            loss = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_MAX_NORM)
        optimizer.step()
        record["losses"].append(loss.item())
        record["peak_rss_mb"].append(rss_mb())
        if device.type == "cuda":
            record["cuda_max_allocated_mb"].append(torch.cuda.max_memory_allocated(device) / 2**20)

    step.record = record
    return step


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    device, warmup, repeats, info = setup(args, 1, 2 if args.quick else 3)
    shape = QUICK if args.quick else FULL
    print(f"model: {shape}, batch {args.batch}", flush=True)

    model = build_detr(shape, aux_loss=True).train()
    criterion = build_criterion(shape).to(device)
    images = random_images(shape, args.batch).to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(shape, args.batch)]

    def copied() -> torch.nn.Module:
        return copy.deepcopy(model).to(device)

    modes = {"plain": make_step(copied(), criterion, images, targets),
             "channels_last": make_step(to_channels_last(copied()), criterion,
                                        images.contiguous(memory_format=torch.channels_last), targets),
             "fast": make_step(optimize_for_training(copied()), criterion, images, targets),
             "fast_torch_dropout": make_step(optimize_for_training(copied(), sparse_dropout=False), criterion,
                                             images, targets)}
    if args.compile:
        modes["compile"] = make_step(torch.compile(copied()), criterion, images, targets)

    rows = summarize(time_interleaved(modes, warmup, repeats, device, args.cpu_time), "plain")
    reference = modes["plain"].record["losses"][0]
    for name, row in rows.items():
        record = modes[name].record
        row.update(first_loss=record["losses"][0], first_loss_abs_diff=abs(record["losses"][0] - reference),
                   peak_rss_mb=max((p for p in record["peak_rss_mb"] if p is not None), default=None),
                   rss_before_step_mb=min((p for p in record["rss_before_mb"] if p is not None), default=None),
                   cuda_max_allocated_mb=max(record["cuda_max_allocated_mb"], default=None))
    print_table(f"training step, batch {args.batch}, {shape.image_hw[0]}x{shape.image_hw[1]}, median of {repeats} "
                f"(warm-up {warmup})", rows,
                [("median s", "median_s", ".3f"), ("vs plain", "speedup", ".2f"), ("first loss", "first_loss", ".6f"),
                 ("|diff|", "first_loss_abs_diff", ".1e"), ("peak RSS MiB", "peak_rss_mb", ".0f"),
                 ("CUDA max MiB", "cuda_max_allocated_mb", ".0f")])
    config = {"model": shape.__dict__, "batch": args.batch, "warmup": warmup, "repeats": repeats,
              "clip_max_norm": CLIP_MAX_NORM, "cpu_time": args.cpu_time}
    write_json("train_step", args, info, config, rows)


if __name__ == "__main__":
    main()
