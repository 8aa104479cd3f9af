"""This project against the original DETR's own code, side by side in one process (needs a clone of it).

    git clone https://github.com/facebookresearch/detr /path/to/detr     # once, where there is a network
    python benchmarks/bench_vs_original.py --original /path/to/detr --threads 2            # inference, batch 1
    python benchmarks/bench_vs_original.py --original /path/to/detr --batch 4
    python benchmarks/bench_vs_original.py --original /path/to/detr --train --batch 2 [--dropout 0.1]

The original's `models/` and `util/` are imported from the clone under their own names, then set
aside so that this project's packages of the same names are the ones the rest of the process sees.
Its model is built from its own classes (detr_resnet50's shape, or --quick's tiny one; its ResNet
with pretrained=False: nothing is downloaded) and loads this project's random weights with
strict=True, so both compute the same function: the outputs' max abs difference is printed.
Inference modes: the original, the project's plain path, `optimize_for_inference` (predict.py's
default) and its ONNX Runtime backend. Training (--train): the original model with its own
SetCriterion and HungarianMatcher, the plain path and `optimize_for_training` (main.py's default),
each with AdamW and clipping as main.py; --dropout sets every dropout (issue 12 measured with 0;
with p > 0 optimize_for_training draws its dropout with models/dropout.py, so its first loss differs
from the others' by the draws, not by rounding).
--amp bf16 (or fp16, inference only) adds the same codes under autocast: the original's model and the
project's fast path each wrapped in torch.autocast (the original has no such flag; a user would wrap it
so), each row's ratio given against the original at the same precision too. TF32 stays torch's default
for every mode (convolutions on, matmuls off), printed with the machine.
Modes run in turn round by round (wall clock, or --cpu-time), medians reported against the original.
The process keeps glibc's default allocator unless --retain_freed_memory (then every mode, the
original's too, runs with the setting predict.py and main.py apply on the CPU).
"""
from __future__ import annotations

import copy
import importlib
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch

from bench_inference import make_runner
from bench_train_step import make_step
from common import (base_parser, clock, machine_info, max_abs_diff, median, print_machine, setup, time_alternating,
                    write_json)
from detr_setup import FULL, QUICK, DetrShape, build_criterion, build_detr, random_images, random_targets

PACKAGES = ("models", "util")


def _package_modules() -> dict[str, types.ModuleType]:
    return {name: module for name, module in sys.modules.items()
            if name in PACKAGES or name.startswith(tuple(p + "." for p in PACKAGES))}


def import_original(clone: str | Path) -> types.SimpleNamespace:
    """The original's backbone, position encoding, transformer, detr and matcher modules, imported from
    the clone while this project's `models`/`util` are set aside, then put back."""
    clone = Path(clone).resolve()
    if not (clone / "models" / "detr.py").is_file() or not (clone / "util" / "misc.py").is_file():
        raise SystemExit(f"--original {clone}: not a DETR clone (no models/detr.py and util/misc.py there); "
                         "clone https://github.com/facebookresearch/detr and pass its folder")
    ours = _package_modules()
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(clone))
    try:
        names = ("backbone", "position_encoding", "transformer", "detr", "matcher")
        loaded = {name: importlib.import_module(f"models.{name}") for name in names}
    finally:
        sys.path.remove(str(clone))
        for name in _package_modules():
            del sys.modules[name]
        sys.modules.update(ours)
    return types.SimpleNamespace(**loaded)


def build_original(original: types.SimpleNamespace, shape: DetrShape, aux_loss: bool) -> torch.nn.Module:
    """detr_resnet50 (or --quick's shape) from the original's own classes, as its build() assembles them."""
    if hasattr(original.backbone, "is_main_process"):
        original.backbone.is_main_process = lambda: False  # it asks torchvision for pretrained weights on rank 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for pretrained=
        backbone = original.backbone.Backbone(shape.backbone, True, False, False)
    position = original.position_encoding.PositionEmbeddingSine(shape.hidden_dim // 2, normalize=True)
    joiner = original.backbone.Joiner(backbone, position)
    joiner.num_channels = backbone.num_channels
    transformer = original.transformer.Transformer(
        d_model=shape.hidden_dim, dropout=0.1, nhead=shape.nheads, dim_feedforward=shape.dim_feedforward,
        num_encoder_layers=shape.enc_layers, num_decoder_layers=shape.dec_layers, normalize_before=False,
        return_intermediate_dec=True)
    return original.detr.DETR(joiner, transformer, num_classes=shape.num_classes, num_queries=shape.num_queries,
                              aux_loss=aux_loss)


def build_original_criterion(original: types.SimpleNamespace, shape: DetrShape) -> torch.nn.Module:
    """The original's SetCriterion with main.py's defaults: costs 1/5/2, weights 1/5/2, eos 0.1, aux losses."""
    matcher = original.matcher.HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    return original.detr.SetCriterion(shape.num_classes, matcher, build_criterion(shape).weight_dict, eos_coef=0.1,
                                      losses=["labels", "boxes", "cardinality"])


def set_dropout(model: torch.nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "dropout", None), float):  # attention modules keep a float
            module.dropout = p


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--original", required=True, help="folder of a clone of facebookresearch/detr")
    parser.add_argument("--batch", type=int, default=None, help="images per forward or step (default 1; --train 2)")
    parser.add_argument("--train", action="store_true", help="time training steps instead of inference")
    parser.add_argument("--dropout", type=float, default=0.0, help="--train: dropout everywhere (default 0)")
    parser.add_argument("--retain_freed_memory", action="store_true",
                        help="first apply util/allocator.py's glibc setting (predict.py's and main.py's CPU "
                             "default) to this process, so every mode runs with it")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                        help="also time the original and the fast path under this autocast (bf16 only with --train)")
    args = parser.parse_args()
    if args.train and args.amp == "fp16":
        raise SystemExit("--amp fp16 --train: fp16 training needs a GradScaler; use --amp bf16")
    if args.retain_freed_memory:
        from util.allocator import retain_freed_memory

        retain_freed_memory()  # before any model or activation is allocated
    device = setup(args)
    shape = QUICK if args.quick else FULL
    batch = args.batch or (2 if args.train else 1)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    info = machine_info(device)
    print_machine(info)
    print(f"model: {shape}, batch {batch}, {'training' if args.train else 'inference'}", flush=True)
    if device.type == "cuda":
        print(f"TF32: convolutions {torch.backends.cudnn.allow_tf32}, matmuls {torch.backends.cuda.matmul.allow_tf32}",
              flush=True)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]

    original_modules = import_original(args.original)
    ours = build_detr(shape, aux_loss=args.train)
    original = build_original(original_modules, shape, aux_loss=args.train)
    original.load_state_dict(ours.state_dict(), strict=True)  # the same layout, so the same weights
    ours.to(device)
    original.to(device)
    images = random_images(shape, batch).to(device)

    if args.train:
        from models.fuse import optimize_for_training

        for model in (ours, original):
            set_dropout(model, args.dropout)
            model.train()
        targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(shape, batch)]
        criterion = build_criterion(shape).to(device)
        modes = {"original": make_step(original, build_original_criterion(original_modules, shape).to(device),
                                       images, targets, device),
                 "plain": make_step(copy.deepcopy(ours), criterion, images, targets, device),
                 "fast_train": make_step(optimize_for_training(copy.deepcopy(ours)), criterion, images, targets,
                                         device)}
        if amp_dtype is not None:
            modes[f"original_{args.amp}"] = make_step(
                copy.deepcopy(original), build_original_criterion(original_modules, shape).to(device), images,
                targets, device, autocast_dtype=amp_dtype)
            modes[f"fast_train_{args.amp}"] = make_step(optimize_for_training(copy.deepcopy(ours)), criterion,
                                                        images, targets, device, autocast_dtype=amp_dtype)
    else:
        from models.fuse import optimize_for_inference

        ours.eval()
        original.eval()
        fused = optimize_for_inference(copy.deepcopy(ours))
        images_cl = images.contiguous(memory_format=torch.channels_last)
        modes = {"original": make_runner(original, images, torch.no_grad),
                 "plain": make_runner(ours, images, torch.no_grad),
                 "fold_bn_cl": make_runner(fused, images_cl, torch.inference_mode)}
        if amp_dtype is not None:
            modes[f"original_{args.amp}"] = make_runner(original, images, torch.no_grad, amp_dtype)
            modes[f"fold_bn_cl_{args.amp}"] = make_runner(fused, images_cl, torch.inference_mode, amp_dtype)
        if device.type == "cpu":
            cache = tempfile.TemporaryDirectory()
            onnx = optimize_for_inference(copy.deepcopy(ours), backend="onnxruntime", onnx_cache_dir=cache.name)
            modes["onnxruntime"] = make_runner(onnx, images, torch.inference_mode)

    times = time_alternating(modes, warmup, repeats, device, clock(args))
    base = median(times["original"])
    rows = {}
    print(f"\n{'mode':17s} {'median s':>9s} {'vs original':>11s} {'same precision':>14s}  "
          f"{'difference from the original':>28s}  rounds")
    for name, fn in modes.items():
        m = median(times[name])
        # the original at this row's precision: original_bf16 for the bf16 rows, else the fp32 original
        same = f"original_{args.amp}" if args.amp and name.endswith(f"_{args.amp}") else "original"
        same_ratio = median(times[same]) / m
        if args.train:
            first = fn.record["losses"][0]
            difference = abs(first - modes[same].record["losses"][0])
            row = {"first_loss": first, "first_loss_abs_diff": difference}
            shown = f"first loss {first:.6f} ({difference:.1e})"
            if name == "fast_train" and args.dropout > 0:
                row["other_dropout_draws"] = True  # models/dropout.py: same distribution, other draws
                shown += "*"
        else:
            difference = max_abs_diff(fn.last, modes[same].last)
            row = {"max_abs_diff": difference}
            shown = f"max abs diff {difference:.1e}"
        rows[name] = {"median_s": m, "speedup_vs_original": base / m, "speedup_vs_original_same_precision": same_ratio,
                      "times_s": times[name], **row}
        print(f"{name:17s} {m:9.4f} {base / m:10.2f}x {same_ratio:13.2f}x  {shown:>28s}  "
              + " ".join(f"{t:.3f}" for t in times[name]), flush=True)
    if args.train and args.dropout > 0:
        print("* optimize_for_training draws dropout with models/dropout.py (same distribution, other draws), "
              "so its first loss differs by the draws")
    write_json("vs_original_train" if args.train else "vs_original", {
        "benchmark": "vs_original", "machine": info, "quick": args.quick,
        "config": {"original": str(Path(args.original).resolve()), "original_detr_py": original_modules.detr.__file__,
                   "batch": batch, "train": args.train,
                   "dropout": args.dropout if args.train else None,
                   "retain_freed_memory": args.retain_freed_memory, "amp": args.amp, "warmup": warmup, "repeats": repeats,
                   "cpu_time": args.cpu_time, "model": shape.__dict__},
        "results": rows}, args.out)


if __name__ == "__main__":
    main()
