"""One training step of detr_resnet50 (forward, matcher, loss, backward, clipping, AdamW), batch 2, 800x1066.

Modes (each on its own copy of the same initial weights, same images and targets):
  eager_fp32      the model as built (the reference)
  channels_last   weights and images in channels_last memory format
  fast_train      models.fuse.optimize_for_training (main.py's default): frozen BN computed inside the
                  conv, conv2d(x, W * s, b'), plus channels_last; same parameters, same gradients up to
                  fp32 rounding; on the CPU dropout draws the dropped positions (models/dropout.py), other
                  draws than torch's, so its first loss differs from the reference by the draws
  fast_train_torch_dropout
                  the same with torch's dropout (--no_sparse_dropout): the first loss matches
  compile         torch.compile of the model (opt-in: --compile; slow to compile on CPU)
Prints the median step time, speed-up, the loss of each mode's first step (same seed, so it must
match the reference up to fp32 noise where the dropout draws are torch's; fast_train's and compiled
dropout draw other random numbers), and the peak
memory of a step: CPU RSS from VmHWM of /proc/self/status (reset before each step through
/proc/self/clear_refs) and CUDA max allocated on GPU.

    python benchmarks/bench_train_step.py
    python benchmarks/bench_train_step.py --compile --profile
"""
from __future__ import annotations

import contextlib
import copy

import torch

from common import (base_parser, clock, machine_info, median, peak_rss_mb, print_machine, profile_table,
                    reset_peak_rss, rss_mb, setup, time_alternating, write_json)
from detr_setup import FULL, QUICK, build_criterion, build_detr, build_optimizer, random_images, random_targets
from models.fuse import optimize_for_training

CLIP_MAX_NORM = 0.1


def make_step(model, criterion, images, targets, device, autocast_dtype=None):
    """A no-argument callable running one training step; it records losses and peak memory.

    autocast_dtype (torch.bfloat16, say) runs forward and loss under autocast, as engine.py's --amp does;
    fp16 would need a GradScaler, so only bf16 is meant here."""
    optimizer = build_optimizer(model)
    weight_dict = criterion.weight_dict
    record = {"losses": [], "peak_rss_mb": [], "rss_before_mb": [], "cuda_max_allocated_mb": []}

    def step() -> None:
        if not record["losses"]:
            torch.manual_seed(0)  # same dropout draws for every eager mode's first step
        record["rss_before_mb"].append(rss_mb())
        reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with amp:
            outputs = model(images)
            loss_dict = criterion(outputs, targets)
            loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_MAX_NORM)
        optimizer.step()
        record["losses"].append(loss.item())
        record["peak_rss_mb"].append(peak_rss_mb())
        if device.type == "cuda":
            record["cuda_max_allocated_mb"].append(torch.cuda.max_memory_allocated(device) / 2**20)

    step.record = record
    return step


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler tables of one eager_fp32 and one fast_train step")
    args = parser.parse_args()
    device = setup(args)
    shape = QUICK if args.quick else FULL
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)

    info = machine_info(device)
    print_machine(info)
    print(f"model: {shape}, batch {args.batch}", flush=True)

    base_model = build_detr(shape, aux_loss=True).train()
    criterion = build_criterion(shape).to(device)
    images = random_images(shape, args.batch).to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(shape, args.batch)]

    modes = {"eager_fp32": make_step(copy.deepcopy(base_model).to(device), criterion, images, targets, device)}
    cl_model = copy.deepcopy(base_model).to(device).to(memory_format=torch.channels_last)
    modes["channels_last"] = make_step(cl_model, criterion, images.contiguous(memory_format=torch.channels_last),
                                       targets, device)
    for name, sparse in (("fast_train", True), ("fast_train_torch_dropout", False)):
        fast_model = optimize_for_training(copy.deepcopy(base_model).to(device), sparse_dropout=sparse)
        modes[name] = make_step(fast_model, criterion, images, targets, device)
    if args.compile:
        compiled = torch.compile(copy.deepcopy(base_model).to(device))
        modes["compile"] = make_step(compiled, criterion, images, targets, device)

    times = time_alternating(modes, warmup, repeats, device, clock(args))
    base = median(times["eager_fp32"])
    reference_loss = modes["eager_fp32"].record["losses"][0]
    rows = {}
    print(f"\ntraining step, batch {args.batch}, {shape.image_hw[0]}x{shape.image_hw[1]}, "
          f"median of {repeats} (warm-up {warmup}):")
    print(f"{'mode':24s} {'median s':>9s} {'speed-up':>8s} {'first loss':>12s} {'|diff|':>9s} "
          f"{'peak RSS MiB':>12s} {'RSS before':>10s} {'CUDA max MiB':>12s}")
    for name, step in modes.items():
        rec = step.record
        m = median(times[name])
        diff = abs(rec["losses"][0] - reference_loss)
        peak = max((p for p in rec["peak_rss_mb"] if p is not None), default=None)
        before = min((p for p in rec["rss_before_mb"] if p is not None), default=None)
        cuda_peak = max(rec["cuda_max_allocated_mb"], default=None)
        rows[name] = {"median_s": m, "speedup_vs_eager_fp32": base / m, "times_s": times[name],
                      "first_loss": rec["losses"][0], "first_loss_abs_diff": diff,
                      "peak_rss_mb": peak, "rss_before_step_mb": before, "cuda_max_allocated_mb": cuda_peak}
        print(f"{name:24s} {m:9.3f} {base / m:7.2f}x {rec['losses'][0]:12.6f} {diff:9.2e} "
              f"{peak or float('nan'):12.0f} {before or float('nan'):10.0f} "
              f"{cuda_peak if cuda_peak is not None else float('nan'):12.0f}", flush=True)

    profiles = {}
    if args.profile:
        for name in ("eager_fp32", "fast_train"):
            profiles[name] = profile_table(name, modes[name], 20, device)

    write_json("train_step", {
        "benchmark": "train_step", "machine": info, "quick": args.quick,
        "config": {"cpu_time": args.cpu_time, "model": shape.__dict__, "batch": args.batch, "warmup": warmup,
                   "repeats": repeats, "clip_max_norm": CLIP_MAX_NORM},
        "results": rows, "profiles": profiles,
    }, args.out)


if __name__ == "__main__":
    main()
