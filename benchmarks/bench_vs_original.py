"""This project side by side with the original DETR's own code, in one process (needs a copy of the original).

    git clone https://github.com/facebookresearch/detr .orig/detr_clone      # once, where there is a network
    python benchmarks/bench_vs_original.py --threads 2 [--batch 4]             # inference
    python benchmarks/bench_vs_original.py --threads 2 --train [--dropout 0.1]  # training step, batch 2

The original's models/ and util/ are imported from the clone (--original) under their own names, then set
aside so that the rest of the process sees this project's packages. Its model, built from its own classes
(ResNet without pretrained weights), loads this project's random weights with strict=True, so both compute
the same function. Inference modes: original, plain (this project's model as built), fast
(optimize_for_inference) and onnxruntime (CPU); --train: the original with its own criterion and matcher,
plain and fast (optimize_for_training), with AdamW and clipping as main.py. --amp adds the original and
fast under autocast, also compared with the original at the same precision.
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
from common import (ROOT, base_parser, max_abs_diff, print_table, setup, summarize, time_interleaved,
                    write_json)
from detr_setup import FULL, QUICK, DetrShape, build_criterion, build_detr, random_images, random_targets
from fast import optimize_for_inference, optimize_for_training, retain_freed_memory

PACKAGES = ("models", "util")
DEFAULT_CLONE = ROOT / ".orig" / "detr_clone"


def _package_modules() -> dict[str, types.ModuleType]:
    return {name: module for name, module in sys.modules.items()
            if name in PACKAGES or name.startswith(tuple(p + "." for p in PACKAGES))}


def import_original(clone: str | Path) -> types.SimpleNamespace:
    """The original's backbone, position_encoding, transformer, detr and matcher modules, imported from the
    clone while this project's `models`/`util` are set aside, then put back."""
    clone = Path(clone).resolve()
    if not (clone / "models" / "detr.py").is_file() or not (clone / "util" / "misc.py").is_file():
        raise SystemExit(f"--original {clone}: not a DETR clone (no models/detr.py and util/misc.py there); "
                         "git clone https://github.com/facebookresearch/detr and pass its folder")
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
    original.backbone.is_main_process = lambda: False  # it asks torchvision for pretrained weights on rank 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for pretrained=
        backbone = original.backbone.Backbone(shape.backbone, True, False, False)
    joiner = original.backbone.Joiner(backbone, original.position_encoding.PositionEmbeddingSine(
        shape.hidden_dim // 2, normalize=True))
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
    parser.add_argument("--original", default=str(DEFAULT_CLONE), help="a clone of facebookresearch/detr")
    parser.add_argument("--batch", type=int, default=None, help="images per forward or step (default 1; --train 2)")
    parser.add_argument("--train", action="store_true", help="time training steps instead of inference")
    parser.add_argument("--dropout", type=float, default=0.0, help="--train: dropout everywhere (default 0)")
    parser.add_argument("--retain_freed_memory", action="store_true", help="predict.py's CPU allocator setting")
    parser.add_argument("--amp", choices=("bf16", "fp16"), help="also time original and fast under this autocast")
    args = parser.parse_args()
    if args.train and args.amp == "fp16":
        raise SystemExit("--amp fp16 --train: fp16 training needs a GradScaler; use --amp bf16")
    original_modules = import_original(args.original)
    if args.retain_freed_memory:
        retain_freed_memory()  # before any model or activation is allocated
    device, warmup, repeats, info = setup(args, 1, 2 if args.quick else 5)
    shape = QUICK if args.quick else FULL
    batch = args.batch or (2 if args.train else 1)
    print(f"model: {shape}, batch {batch}, {'training' if args.train else 'inference'}", flush=True)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]

    ours = build_detr(shape, aux_loss=args.train)
    original = build_original(original_modules, shape, aux_loss=args.train)
    original.load_state_dict(ours.state_dict(), strict=True)  # the same layout, so the same weights
    ours.to(device)
    original.to(device)
    images = random_images(shape, batch).to(device)
    if args.train:
        for model in (ours, original):
            set_dropout(model, args.dropout)
        targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(shape, batch)]
        criterion = build_criterion(shape).to(device)

        def original_step(dtype: torch.dtype | None):
            return make_step(copy.deepcopy(original), build_original_criterion(original_modules, shape).to(device),
                             images, targets, dtype)

        def fast_step(dtype: torch.dtype | None):
            return make_step(optimize_for_training(copy.deepcopy(ours)), criterion, images, targets, dtype)

        modes = {"original": original_step(None), "plain": make_step(copy.deepcopy(ours), criterion, images, targets),
                 "fast": fast_step(None)}
        if amp is not None:
            modes.update({f"original_{args.amp}": original_step(amp), f"fast_{args.amp}": fast_step(amp)})
    else:
        ours.eval()
        original.eval()
        fast_model = optimize_for_inference(copy.deepcopy(ours))
        images_cl = images.contiguous(memory_format=torch.channels_last)
        modes = {"original": make_runner(original, images, torch.no_grad),
                 "plain": make_runner(ours, images, torch.no_grad), "fast": make_runner(fast_model, images_cl)}
        if amp is not None:
            modes[f"original_{args.amp}"] = make_runner(original, images, torch.no_grad, amp)
            modes[f"fast_{args.amp}"] = make_runner(fast_model, images_cl, autocast_dtype=amp)
        if device.type == "cpu":
            cache = tempfile.TemporaryDirectory()
            modes["onnxruntime"] = make_runner(optimize_for_inference(
                copy.deepcopy(ours), backend="onnxruntime", onnx_cache_dir=cache.name), images)

    rows = summarize(time_interleaved(modes, warmup, repeats, device, args.cpu_time), "original")
    for name, row in rows.items():
        # compared with the original at this row's precision: original_bf16 for the bf16 rows
        same = f"original_{args.amp}" if args.amp and name.endswith(f"_{args.amp}") else "original"
        row["speedup_same_precision"] = rows[same]["median_s"] / row["median_s"]
        if args.train:
            row["first_loss"] = modes[name].record["losses"][0]
            row["first_loss_abs_diff"] = abs(row["first_loss"] - modes[same].record["losses"][0])
        else:
            row["max_abs_diff"] = max_abs_diff(modes[name].last, modes[same].last)
    columns = [("median s", "median_s", ".4f"), ("vs original", "speedup", ".2f"),
               ("same precision", "speedup_same_precision", ".2f")]
    columns += ([("first loss", "first_loss", ".6f"), ("loss diff", "first_loss_abs_diff", ".1e")] if args.train
                else [("max|diff|", "max_abs_diff", ".1e")])
    print_table(f"{'training step' if args.train else 'inference'}, batch {batch}, side by side with the original "
                f"({args.original}), median of {repeats} (warm-up {warmup})", rows, columns)
    if args.train and args.dropout > 0:
        print("the fast path draws its dropout positions differently: its first loss differs by the draws")
    write_json("vs_original_train" if args.train else "vs_original", args, info, {
        "original": str(Path(args.original).resolve()), "original_detr_py": original_modules.detr.__file__,
        "batch": batch, "train": args.train, "dropout": args.dropout if args.train else None, "amp": args.amp,
        "retain_freed_memory": args.retain_freed_memory, "warmup": warmup, "repeats": repeats,
        "cpu_time": args.cpu_time, "model": shape.__dict__}, rows)


if __name__ == "__main__":
    main()
