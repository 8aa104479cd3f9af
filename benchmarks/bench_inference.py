"""Inference latency and throughput of detr_resnet50 at 800x1066: plain fp32 eager versus each faster mode.

Modes (all on the same random weights and the same input):
  eager_fp32        the model as built, model.eval(), torch.no_grad()  (the reference)
  original_style    eager_fp32 with torch's nn.MultiheadAttention computing attention weights, as the
                    original's transformer did (it never passed need_weights=False): the original's work
  inference_mode    the same model under torch.inference_mode()
  fold_bn_cl        models.fuse.optimize_for_inference: frozen BN folded into the convs + channels_last
  onnxruntime       optimize_for_inference(backend='onnxruntime'): the folded model in ONNX Runtime
                    (CPU only; skipped on CUDA; the one-off export is timed apart)
  compile           fold_bn_cl through torch.compile                    (opt-in: --compile)
  bf16_autocast     fold_bn_cl under bf16 autocast; changes numbers (opt-in: --bf16)
Prints the median latency, s/img, img/s, GFLOP/s (FLOPs of the plain forward counted once by
torch.utils.flop_counter), speed-up and the max abs difference of pred_logits and pred_boxes from
the reference for each batch size, and writes them as JSON.

    python benchmarks/bench_inference.py                       # batch 1 and 4, 800x1066
    python benchmarks/bench_inference.py --compile --bf16 --profile
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
import time

import torch

from common import (base_parser, clock, machine_info, max_abs_diff, median, print_machine, profile_table, setup,
                    sync, time_alternating, write_json)
from detr_setup import FULL, QUICK, build_detr, random_images, with_original_attention

FP32_TOLERANCE = 1e-4


def fused_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model through models.fuse.optimize_for_inference (BN folded, channels_last)."""
    from models.fuse import optimize_for_inference

    return optimize_for_inference(copy.deepcopy(model))


def flop_count(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one forward, as torch.utils.flop_counter counts them
    (convolutions, matmuls, attention; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:  # its module tracking does not work under inference_mode
        model(images)
    return counter.get_total_flops()


def make_runner(model: torch.nn.Module, images: torch.Tensor, grad_context, autocast_dtype=None):
    """A no-argument callable running one forward pass; it keeps the last output for comparison."""
    device_type = images.device.type
    last: dict = {}

    def run() -> dict:
        amp = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype
               else contextlib.nullcontext())
        with grad_context(), amp:
            out = model(images)
        last.update(pred_logits=out["pred_logits"], pred_boxes=out["pred_boxes"])
        return last

    run.last = last
    return run


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4; quick 1,2)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast (changes numbers)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler tables of eager_fp32 and fold_bn_cl at the first batch size")
    args = parser.parse_args()
    device = setup(args)
    shape = QUICK if args.quick else FULL
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.quick else "1,4")).split(",")]

    info = machine_info(device)
    print_machine(info)
    print(f"model: {shape}", flush=True)

    model = build_detr(shape, aux_loss=False).eval().to(device)
    original_style = with_original_attention(model).eval()
    fused = fused_copy(model)
    onnx_model, export_s = None, None
    if device.type == "cpu":
        from models.fuse import optimize_for_inference

        cache = tempfile.TemporaryDirectory()
        start = time.perf_counter()
        onnx_model = optimize_for_inference(copy.deepcopy(model), backend="onnxruntime", onnx_cache_dir=cache.name)
        export_s = time.perf_counter() - start
        print(f"onnxruntime: export + session {export_s:.1f} s", flush=True)
    compiled = None
    if args.compile:
        compiled = torch.compile(fused)

    results: dict = {}
    profiles: dict = {}
    for batch in batch_sizes:
        images = random_images(shape, batch).to(device)
        images_cl = images.contiguous(memory_format=torch.channels_last)
        modes = {
            "eager_fp32": make_runner(model, images, torch.no_grad),
            "original_style": make_runner(original_style, images, torch.no_grad),
            "inference_mode": make_runner(model, images, torch.inference_mode),
        }
        modes["fold_bn_cl"] = make_runner(fused, images_cl, torch.inference_mode)
        if onnx_model is not None:
            modes["onnxruntime"] = make_runner(onnx_model, images, torch.inference_mode)
        gflop = flop_count(model, images) / 1e9
        compile_s = None
        if compiled is not None:
            modes["compile"] = make_runner(compiled, images_cl, torch.inference_mode)
            start = time.perf_counter()
            modes["compile"]()
            sync(device)
            compile_s = time.perf_counter() - start
            print(f"batch {batch}: torch.compile first call {compile_s:.1f} s", flush=True)
        if args.bf16:
            modes["bf16_autocast"] = make_runner(fused, images_cl, torch.inference_mode, torch.bfloat16)

        times = time_alternating(modes, warmup, repeats, device, clock(args))
        reference = modes["eager_fp32"].last
        base = median(times["eager_fp32"])
        original = median(times["original_style"])
        rows = {}
        print(f"\nbatch {batch}, {shape.image_hw[0]}x{shape.image_hw[1]}, "
              f"median of {repeats} (warm-up {warmup}):", flush=True)
        print(f"{'mode':16s} {'median s':>9s} {'s/img':>8s} {'img/s':>7s} {'GFLOP/s':>8s} {'vs eager':>8s} "
              f"{'vs orig':>8s} {'max|diff|':>10s}")
        for name, run in modes.items():
            m = median(times[name])
            diff = max_abs_diff(run.last, reference)
            is_fp32 = name != "bf16_autocast"
            rows[name] = {
                "median_s": m, "s_per_img": m / batch, "img_per_s": batch / m,
                "speedup_vs_eager_fp32": base / m, "speedup_vs_original_style": original / m,
                "max_abs_diff": diff, "fp32": is_fp32, "gflop_per_call": gflop, "gflop_per_s": gflop / m,
                "within_1e-4": diff <= FP32_TOLERANCE, "times_s": times[name],
            }
            if name == "compile":
                rows[name]["compile_first_call_s"] = compile_s
            if name == "onnxruntime":
                rows[name]["export_s"] = export_s
            flag = "" if (not is_fp32 or diff <= FP32_TOLERANCE) else "  EXCEEDS 1e-4"
            print(f"{name:16s} {m:9.3f} {m / batch:8.3f} {batch / m:7.2f} {gflop / m:8.1f} {base / m:7.2f}x "
                  f"{original / m:7.2f}x "
                  f"{diff:10.2e}{flag}", flush=True)
        results[f"batch_{batch}"] = rows
        if args.profile and not profiles:
            for name in ("eager_fp32", "fold_bn_cl"):
                if name in modes:
                    profiles[name] = profile_table(f"{name}, batch {batch}", modes[name], 15, device)

    write_json("inference", {
        "benchmark": "inference", "machine": info, "quick": args.quick,
        "config": {"cpu_time": args.cpu_time, "model": shape.__dict__, "warmup": warmup, "repeats": repeats,
                   "batch_sizes": batch_sizes},
        "results": results, "profiles": profiles,
    }, args.out)


if __name__ == "__main__":
    main()
