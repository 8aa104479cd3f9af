"""CPU inference (or --train: training steps) with glibc's default malloc versus
util.allocator.retain_freed_memory (predict.py's and main.py's default on the CPU).

The setting is process-wide, so each mode runs in its own child process; the parent starts them in
turn (default, retained, default, retained, ...) so that load from other processes hits both alike,
and reports the median forward time of each and their ratio. A child builds detr_resnet50 (random
weights), applies models.fuse.optimize_for_inference (or ONNX Runtime with --backend onnxruntime),
runs one untimed forward per picture size, then times --forwards forwards cycling through the sizes
(several sizes, as predict.py meets them, so the heap has to serve changing shapes), and reports
its times and peak RSS. Outputs are equal in both modes (same weights, same kernels).
With --train a child instead times training steps of models.fuse.optimize_for_training (main.py's
default; batch --batch at the first size, dropout 0.1 as built, AdamW and clipping as main.py).

    python benchmarks/bench_allocator.py                    # 5 rounds, sizes 800x1066, 800x1199, 1066x800
    python benchmarks/bench_allocator.py --sizes 800x1066 --threads 1
    python benchmarks/bench_allocator.py --train --sizes 800x1066          # training, batch 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from common import base_parser, machine_info, median, peak_rss_mb, print_machine, write_json
from detr_setup import FULL, QUICK, build_detr

MODES = ("glibc_default", "retain_freed_memory")


def train_child(shape, size: tuple[int, int], batch: int, steps: int) -> list[float]:
    """Times of `steps` training steps after one untimed step (this child's allocator as set)."""
    from bench_train_step import make_step
    from detr_setup import build_criterion, random_targets
    from models.fuse import optimize_for_training

    model = optimize_for_training(build_detr(shape, aux_loss=True).train())
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    step = make_step(model, build_criterion(shape), images, random_targets(shape, batch), torch.device("cpu"))
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def child(mode: str, quick: bool, sizes: list[tuple[int, int]], forwards: int, threads: int | None,
          backend: str, train_batch: int | None = None) -> dict:
    """One mode's measurement, in this (child) process."""
    import copy
    import tempfile

    from models.fuse import optimize_for_inference
    from util.allocator import retain_freed_memory

    applied = retain_freed_memory() if mode == "retain_freed_memory" else False
    if threads is not None:
        torch.set_num_threads(threads)
    shape = QUICK if quick else FULL
    if train_batch is not None:
        times = train_child(shape, sizes[0], train_batch, forwards)
        return {"mode": mode, "applied": applied, "times_s": times, "peak_rss_mb": peak_rss_mb()}
    model = build_detr(shape, aux_loss=False).eval()
    if backend == "onnxruntime":
        cache = tempfile.TemporaryDirectory()
        model = optimize_for_inference(copy.deepcopy(model), backend="onnxruntime", onnx_cache_dir=cache.name)
    else:
        model = optimize_for_inference(model)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, h, w, generator=generator) for h, w in sizes]
    times = []
    with torch.inference_mode():
        for x in images:  # warm-up: one forward per size
            model(x)
        for i in range(forwards):
            start = time.perf_counter()
            model(images[i % len(images)])
            times.append(time.perf_counter() - start)
    return {"mode": mode, "applied": applied, "times_s": times, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None,
                        help="comma-separated HxW picture sizes cycled through (default 800x1066,800x1199,1066x800)")
    parser.add_argument("--forwards", type=int, default=None, help="timed forwards per child (default 3)")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    parser.add_argument("--train", action="store_true", help="time training steps instead of forwards")
    parser.add_argument("--batch", type=int, default=2, help="--train: images per step (default 2)")
    parser.add_argument("--child", default=None, choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    default_sizes = "64x96,64x80" if args.quick else "800x1066,800x1199,1066x800"
    sizes = [tuple(int(v) for v in s.split("x")) for s in (args.sizes or default_sizes).split(",")]
    forwards = args.forwards or (2 if args.quick else 3)
    if args.child:
        print(json.dumps(child(args.child, args.quick, sizes, forwards, args.threads, args.backend,
                               args.batch if args.train else None)))
        return
    if args.device != "cpu":
        raise SystemExit("bench_allocator.py measures glibc malloc on the CPU: use --device cpu")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    info = machine_info(torch.device("cpu"))
    print_machine(info)
    what = f"training steps of batch {args.batch} at {sizes[0]}" if args.train else f"forwards, sizes {sizes}"
    print(f"model: {QUICK if args.quick else FULL}, backend {args.backend}, {what}, "
          f"{forwards} timed per child, {repeats} rounds", flush=True)

    command = [sys.executable, __file__, "--sizes", ",".join(f"{h}x{w}" for h, w in sizes),
               "--forwards", str(forwards), "--backend", args.backend]
    command += ["--quick"] if args.quick else []
    command += ["--threads", str(args.threads)] if args.threads is not None else []
    command += ["--train", "--batch", str(args.batch)] if args.train else []
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_index in range(repeats):
        for mode in MODES:
            done = subprocess.run(command + ["--child", mode], capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[mode].append(result)
            print(f"round {round_index + 1} {mode:20s} " + " ".join(f"{t:.3f}" for t in result["times_s"])
                  + f" s, peak RSS {result['peak_rss_mb']:.0f} MiB", flush=True)

    rows = {}
    base = median([t for r in runs["glibc_default"] for t in r["times_s"]])
    print(f"\n{f'training step, batch {args.batch}' if args.train else 'forward, batch 1'}, "
          f"median over {repeats} children x {forwards}:")
    for mode in MODES:
        m = median([t for r in runs[mode] for t in r["times_s"]])
        peak = max(r["peak_rss_mb"] or 0.0 for r in runs[mode])
        rows[mode] = {"median_s": m, "speedup_vs_glibc_default": base / m, "peak_rss_mb": peak,
                      "applied": runs[mode][0]["applied"], "times_s": [r["times_s"] for r in runs[mode]]}
        print(f"{mode:20s} {m:8.3f} s {base / m:6.2f}x  peak RSS {peak:6.0f} MiB"
              + ("" if mode == "glibc_default" or rows[mode]["applied"] else "  (not applied: no glibc)"),
              flush=True)
    write_json("allocator", {"benchmark": "allocator", "machine": info, "quick": args.quick,
                             "config": {"sizes": sizes, "forwards": forwards, "rounds": repeats,
                                        "train_batch": args.batch if args.train else None,
                                        "threads": args.threads, "backend": args.backend},
                             "results": rows}, args.out)


if __name__ == "__main__":
    main()
