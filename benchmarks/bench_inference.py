"""Inference of detr_resnet50 at 800x1066: the plain model against each faster mode, batch 1 and 4.

Modes (the same random weights and input, interleaved round by round):
  plain        the model as built, eval(), torch.no_grad()  (the reference)
  fast         fast.optimize_for_inference (predict.py's default), channels_last input, inference_mode
  onnxruntime  optimize_for_inference(backend='onnxruntime'); CPU only, its one-off export timed apart
  compile      `fast` through torch.compile (opt-in: --compile); bf16: `fast` under bf16 autocast (--bf16)
Prints median s, s/img, img/s, GFLOP/s (torch.utils.flop_counter's count of the plain forward), speed-up
over plain and the max abs difference of pred_logits/pred_boxes from plain.

    python benchmarks/bench_inference.py --threads 2 [--compile] [--bf16] [--profile]
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from typing import Callable

import torch

from common import (base_parser, max_abs_diff, print_profile, print_table, setup, summarize, time_interleaved,
                    write_json)
from detr_setup import FULL, QUICK, build_detr, random_images
from fast import optimize_for_inference

def make_runner(model: torch.nn.Module, images: torch.Tensor, grad_context: Callable = torch.inference_mode,
                autocast_dtype: torch.dtype | None = None) -> Callable[[], dict]:
    """A no-argument callable running one forward; `run.last` keeps its pred_logits and pred_boxes."""
    last: dict = {}

    def run() -> dict:
        amp = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with grad_context(), amp:
            out = model(images)
        last.update(pred_logits=out["pred_logits"], pred_boxes=out["pred_boxes"])
        return last

    run.last = last
    return run


def flop_count(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one forward as torch.utils.flop_counter counts them (no elementwise ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images)
    return counter.get_total_flops()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4; --quick 1,2)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the fast model")
    parser.add_argument("--bf16", action="store_true", help="also time the fast model under bf16 autocast")
    parser.add_argument("--profile", action="store_true", help="print profiler tables of plain and fast (first batch)")
    args = parser.parse_args()
    device, warmup, repeats, info = setup(args, 1, 2 if args.quick else 5)
    shape = QUICK if args.quick else FULL
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.quick else "1,4")).split(",")]
    print(f"model: {shape}", flush=True)

    model = build_detr(shape, aux_loss=False).eval().to(device)
    fast_model = optimize_for_inference(copy.deepcopy(model))
    onnx_model, export_s = None, None
    if device.type == "cpu":
        cache = tempfile.TemporaryDirectory()
        start = time.perf_counter()
        onnx_model = optimize_for_inference(copy.deepcopy(model), backend="onnxruntime", onnx_cache_dir=cache.name)
        export_s = time.perf_counter() - start
        print(f"onnxruntime: export and session {export_s:.1f} s", flush=True)
    compiled = torch.compile(fast_model) if args.compile else None

    results, profiles = {}, {}
    for batch in batch_sizes:
        images = random_images(shape, batch).to(device)
        images_cl = images.contiguous(memory_format=torch.channels_last)
        modes = {"plain": make_runner(model, images, torch.no_grad), "fast": make_runner(fast_model, images_cl)}
        if onnx_model is not None:
            modes["onnxruntime"] = make_runner(onnx_model, images)
        if compiled is not None:
            modes["compile"] = make_runner(compiled, images_cl)
        if args.bf16:
            modes["bf16"] = make_runner(fast_model, images_cl, autocast_dtype=torch.bfloat16)
        gflop = flop_count(model, images) / 1e9

        rows = summarize(time_interleaved(modes, warmup, repeats, device, args.cpu_time), "plain")
        for name, row in rows.items():
            seconds = row["median_s"]
            row.update(s_per_img=seconds / batch, img_per_s=batch / seconds, gflop_per_s=gflop / seconds,
                       max_abs_diff=max_abs_diff(modes[name].last, modes["plain"].last))
        if onnx_model is not None:
            rows["onnxruntime"]["export_s"] = export_s
        results[f"batch_{batch}"] = rows
        print_table(f"inference, batch {batch}, {shape.image_hw[0]}x{shape.image_hw[1]}, median of {repeats} "
                    f"(warm-up {warmup})", rows,
                    [("median s", "median_s", ".3f"), ("s/img", "s_per_img", ".3f"), ("img/s", "img_per_s", ".2f"),
                     ("GFLOP/s", "gflop_per_s", ".1f"), ("vs plain", "speedup", ".2f"),
                     ("max|diff|", "max_abs_diff", ".1e")])
        if args.profile and not profiles:
            profiles = {name: print_profile(f"{name}, batch {batch}", modes[name], device)
                        for name in ("plain", "fast")}

    write_json("inference", args, info, {"model": shape.__dict__, "warmup": warmup, "repeats": repeats,
                                         "batch_sizes": batch_sizes, "cpu_time": args.cpu_time},
               results, profiles=profiles)


if __name__ == "__main__":
    main()
