"""Train or evaluate DETR: flags -> datasets -> model -> weights -> loop -> run directory.

Run directory (--output_dir), as the original: checkpoint.pth every epoch, checkpointNNNN.pth
when (epoch + 1) is a multiple of --lr_drop or 100, log.txt (one JSON line per epoch),
eval/latest.pth and eval/NNN.pth (epoch % 50 == 0); eval.pth with --eval; plus TensorBoard
scalars in tensorboard/, and checkpoint_best.pth (model, args, epoch; no optimizer state),
rewritten when an evaluation beats every earlier one of the run (val box AP, PQ for panoptic; log.txt's test_best_bbox_AP or test_best_PQ
and test_best_epoch).

Exact resume: at the start of every epoch the Python, NumPy and torch generators are reseeded
from (seed, rank, epoch), the sampler's generator from (seed, epoch) and the DataLoader's worker
seeds from (seed, rank, epoch); so an epoch's data order, augmentation and dropout do not depend
on what ran before it, and "2 epochs" equals "1 epoch + --resume + 1 epoch" bit for bit on CPU,
with --num_workers 0 and also with workers (same --num_workers on both sides).
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import datasets
from datasets.transforms import AUGMENTATIONS
from engine import AMP_MODES, NonFiniteLossError, autocast_context, evaluate, make_grad_scaler, train_one_epoch
from models import build_model
from models.fuse import optimize_for_inference, optimize_for_training, to_channels_last
from util import allocator
from util import distributed as dist_utils
from util.checkpoint import (RESUME_AUTO, CheckpointError, adapt_for_finetune, capture_rng_state,
                             ensure_writable_dir, fit_training_only, load_checkpoint, load_model_state,
                             restore_rng_state, resume_source, save_checkpoint)
from util.cli import HelpFormatter, exit_on_user_error
from util.ema import ModelEMA
from util.nested_tensor import collate_fn
from util.tensorboard import TensorboardWriter


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag of the original main.py (same defaults) plus the project's own, in the original's
    groups; add_help=False so other scripts (run_with_submitit.py, predict.py) can use it as a
    parent parser (the groups carry over)."""
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", default=1e-4, type=float, help="AdamW learning rate outside the backbone")
    optim.add_argument("--lr_backbone", default=1e-5, type=float,
                       help="backbone learning rate; 0 or less freezes the backbone")
    optim.add_argument("--batch_size", default=2, type=int, help="images per process")
    optim.add_argument("--grad_accum_steps", default=1, type=int,
                       help="optimizer step every N batches, the loss normalised as for one batch of N x "
                            "--batch_size images (effective batch N x batch_size x processes)")
    optim.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW weight decay")
    optim.add_argument("--epochs", default=300, type=int, help="total epochs")
    optim.add_argument("--lr_drop", default=200, type=int, help="StepLR step size in epochs (lr x0.1)")
    optim.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm; 0 disables")

    model = parser.add_argument_group("model")
    model.add_argument("--frozen_weights", type=str, default=None,
                       help="path/URL of a trained box model; only the mask head is trained (needs --masks)")
    model.add_argument("--num_classes", default=None, type=int,
                       help="classes (max category id + 1); inferred from the dataset when not given")

    backbone = parser.add_argument_group("model: backbone")
    backbone.add_argument("--backbone", default="resnet50", type=str, help="torchvision ResNet name")
    backbone.add_argument("--dilation", action="store_true",
                          help="replace stride by dilation in the last block (DC5)")
    backbone.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"),
                          help="positional encoding of the image features")
    backbone.add_argument("--backbone_weights", default="imagenet", type=str,
                          help="'imagenet' (torchvision file in the torch hub cache), 'none' (random init, "
                               "trainable BatchNorm) or a path; ignored when --resume/--frozen_weights/--finetune "
                               "provide the weights")

    backbone.add_argument("--trainable_backbone_layers", default=3, type=int, choices=range(6), metavar="0..5",
                          help="ResNet stages trained, from layer4 down (3: layer2-4 as in the original; 5 "
                               "adds layer1 and the stem, for a backbone trained from scratch); with "
                               "--lr_backbone 0 none are")

    transformer = parser.add_argument_group("model: transformer")
    transformer.add_argument("--enc_layers", default=6, type=int, help="encoder layers")
    transformer.add_argument("--dec_layers", default=6, type=int, help="decoder layers")
    transformer.add_argument("--dim_feedforward", default=2048, type=int, help="width of the feed-forward blocks")
    transformer.add_argument("--hidden_dim", default=256, type=int, help="transformer width (embedding size)")
    transformer.add_argument("--dropout", default=0.1, type=float, help="dropout inside the transformer")
    transformer.add_argument("--nheads", default=8, type=int, help="attention heads")
    transformer.add_argument("--num_queries", default=100, type=int, help="object queries (most boxes per image)")
    transformer.add_argument("--pre_norm", action="store_true", help="LayerNorm before attention/FFN, not after")

    segm = parser.add_argument_group("model: segmentation")
    segm.add_argument("--masks", action="store_true", help="train the segmentation head")
    segm.add_argument("--mask_loss_on_padding", action="store_true",
                      help="count padded pixels in the mask losses (the original's behaviour)")

    loss = parser.add_argument_group("loss")
    loss.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                      help="disable the auxiliary decoding losses (one per decoder layer)")

    fast = parser.add_argument_group("faster convergence (training only: the inference model stays the plain DETR)")
    fast.add_argument("--group_detr", default=1, type=int,
                      help="Group DETR: K groups of --num_queries queries, each matched one-to-one, self-attention "
                           "inside each group; evaluation and inference use group 0 (1 = the original)")
    fast.add_argument("--ema", default=0.0, type=float,
                      help="decay of an exponential moving average of the weights (e.g. 0.999; 0 = off): evaluated "
                           "beside the raw weights (test_ema_* in log.txt), saved as checkpoint_ema.pth")

    matcher = parser.add_argument_group("matcher (Hungarian matching costs)")
    matcher.add_argument("--set_cost_class", default=1, type=float, help="weight of the class cost")
    matcher.add_argument("--set_cost_bbox", default=5, type=float, help="weight of the L1 box cost")
    matcher.add_argument("--set_cost_giou", default=2, type=float, help="weight of the generalized IoU cost")

    coefs = parser.add_argument_group("loss coefficients")
    coefs.add_argument("--mask_loss_coef", default=1, type=float, help="weight of the focal mask loss")
    coefs.add_argument("--dice_loss_coef", default=1, type=float, help="weight of the dice mask loss")
    coefs.add_argument("--bbox_loss_coef", default=5, type=float, help="weight of the L1 box loss")
    coefs.add_argument("--giou_loss_coef", default=2, type=float, help="weight of the generalized IoU loss")
    coefs.add_argument("--eos_coef", default=0.1, type=float, help="relative weight of the no-object class")

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset_file", default="coco", choices=datasets.DATASET_FILES,
                      help="dataset kind; shapes = generated toy data, custom = your COCO-format export")
    data.add_argument("--coco_path", type=str,
                      help="coco: root with train2017/, val2017/, annotations/instances_{train,val}2017.json")
    data.add_argument("--coco_panoptic_path", type=str,
                      help="coco_panoptic: root with annotations/panoptic_{train,val}2017.json and PNG folders")
    data.add_argument("--remove_difficult", action="store_true", help="kept for compatibility; has no effect")
    data.add_argument("--data_path", default="data/shapes", type=str,
                      help="shapes: where the data is generated on first use; yolo: the export's root folder")
    data.add_argument("--shapes_train_size", default=256, type=int, help="shapes: training images")
    data.add_argument("--shapes_val_size", default=64, type=int, help="shapes: validation images")
    data.add_argument("--shapes_image_size", default=128, type=int, help="shapes: longer image side in pixels")
    data.add_argument("--train_images", type=str, help="custom: training image folder")
    data.add_argument("--train_annotations", type=str, help="custom: training COCO-format JSON")
    data.add_argument("--val_images", type=str, help="custom: validation image folder")
    data.add_argument("--val_annotations", type=str, help="custom: validation COCO-format JSON")
    data.add_argument("--image_scale", default=1.0, type=float,
                      help="multiplies every image size of the augmentation recipe")
    data.add_argument("--augment", default="detr", choices=AUGMENTATIONS,
                      help="training augmentation: detr = the original's (flip, multi-scale, crop); "
                           "flip = flip + the val resize; none = the val transform")
    data.add_argument("--copy_paste", default=0, type=int, metavar="N",
                      help="training only: paste up to N objects cut along their polygons out of another "
                           "training image into each one (Simple Copy-Paste); 0 = off, the original")
    data.add_argument("--num_workers", default=2, type=int, help="DataLoader worker processes")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="", help="where to save; empty = save nothing")
    run.add_argument("--device", default="cuda", help="device for training/testing (cuda, cuda:N, cpu)")
    run.add_argument("--seed", default=42, type=int, help="seed; each process adds its rank")
    run.add_argument("--resume", default="", help="checkpoint path or https/file URL to resume from; 'auto': "
                     "--output_dir's checkpoint.pth if there is one, else start fresh")
    run.add_argument("--overwrite", action="store_true",
                     help="start a fresh run even if --output_dir holds a checkpoint (refused without it)")
    run.add_argument("--finetune", default="", help="checkpoint path/URL whose weights start a fresh run "
                     "(epoch 0, new optimizer; class head/queries of another shape re-initialised)")
    run.add_argument("--start_epoch", default=0, type=int, metavar="N",
                     help="first epoch (a --resume checkpoint sets it)")
    run.add_argument("--eval", action="store_true", help="evaluate only")
    run.add_argument("--eval_every", default=1, type=int,
                     help="evaluate every N epochs during training (and after the last); 0 = never")
    run.add_argument("--eval_backend", default="pycocotools", choices=("pycocotools", "faster"),
                     help="COCO evaluation: pycocotools, or faster-coco-eval (same numbers)")
    run.add_argument("--amp", default="off", choices=AMP_MODES,
                     help="autocast dtype for the forward pass (fp16 needs CUDA)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model for train and eval")
    run.add_argument("--channels_last", action="store_true",
                     help="NHWC convolution weights and backbone input (same numbers to fp32 rounding); "
                          "part of the default fast training path, so only needed with --no_fast_train or --amp")
    run.add_argument("--no_fast_train", action="store_true",
                     help="train the model as built; by default (with --amp off) frozen BatchNorm is computed "
                          "inside its convolution, tensors are channels_last and CPU dropout draws the dropped "
                          "positions instead of a mask (models.fuse.optimize_for_training: same checkpoint layout; "
                          "with the same dropout draws the same loss to 1e-5)")
    run.add_argument("--no_sparse_dropout", action="store_true",
                     help="with the fast training path, keep torch's dropout (one Bernoulli draw per element: the "
                          "draws --no_fast_train makes for a seed) instead of models/dropout.py's, which has the "
                          "same distribution and is ~3x faster on the CPU")
    run.add_argument("--no_malloc_tuning", action="store_true",
                     help="leave glibc malloc as it is; by default, on the CPU, freed memory stays in the process "
                          "so each step or forward reuses its activations' pages instead of page-faulting them in "
                          "again (util/allocator.py: a CPU training step 1.3x faster, predict.py 1.07x end to end; "
                          "the process keeps its peak memory, +10 %% in training)")
    run.add_argument("--fuse_eval", action="store_true",
                     help="with --eval: fold frozen BatchNorm into the convolutions and use channels_last "
                          "(models.fuse.optimize_for_inference; outputs within ~1e-5)")
    run.add_argument("--print_freq", default=10, type=int, help="console progress line every N iterations")
    run.add_argument("--print_all_losses", action="store_true",
                     help="progress line with every loss term (scaled, unscaled, auxiliary), as the original; "
                          "log.txt always has them all")
    run.add_argument("--tb_freq", default=50, type=int, help="TensorBoard loss every N iterations")

    dist = parser.add_argument_group("distributed")
    dist.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    dist.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    return parser


# ---------------------------------------------------------------------------------------------
# Seeding


def derived_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (seed, rank, epoch, ...); distinct tuples rarely collide."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Weights


def _checkpoint_args_backbone(checkpoint: dict) -> str:
    return getattr(checkpoint.get("args"), "backbone_weights", "imagenet")


def _load_finetune(model: torch.nn.Module, source: str, checkpoint: dict) -> None:
    """Checkpoint weights into `model`; class head / queries of another shape re-initialised."""
    state = checkpoint["model"]
    target = model
    # A box checkpoint into a --masks model: the weights belong to the inner detr.
    if hasattr(model, "detr") and not any(k.startswith("detr.") for k in state):
        target = model.detr
    state = fit_training_only(target, state, what=f"--finetune {source}")
    try:
        state, reinitialised = adapt_for_finetune(target, state)
    except ValueError as err:
        raise CheckpointError(f"--finetune {source}: {err}") from err
    load_model_state(target, state, what=f"checkpoint {source}")
    if reinitialised:
        print(f"--finetune {source}: re-initialised (shape differs from the checkpoint): {', '.join(reinitialised)}")
    else:
        print(f"--finetune {source}: every tensor loaded from the checkpoint")


def _trim_log(output_dir: Path, start_epoch: int) -> None:
    """Drop log.txt lines of epochs >= start_epoch (written by a run killed before its checkpoint)."""
    log = output_dir / "log.txt"
    if not log.is_file() or not dist_utils.is_main_process():
        return
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", -1) < start_epoch]
    if len(kept) != len(lines):
        tmp = log.with_name(".log.txt.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(log)


def _resolve_resume(args, output_dir: Path | None) -> str:
    """util.checkpoint.resume_source decided by rank 0 for every process, so all ranks resume
    from the same epoch (or all refuse) even if they saw the folder at different moments."""
    decision = ("", "")
    if dist_utils.is_main_process():
        try:
            decision = (resume_source(args.resume, output_dir, overwrite=args.overwrite, training=not args.eval), "")
        except CheckpointError as err:
            decision = ("", str(err))
        if args.overwrite and decision == ("", "") and not args.eval and output_dir is not None:
            # the old run's best and averaged weights are not this run's: they must not outlive the restart
            (output_dir / "checkpoint_best.pth").unlink(missing_ok=True)
            (output_dir / "checkpoint_ema.pth").unlink(missing_ok=True)
    resume, error = dist_utils.all_gather(decision)[0]
    if error:
        raise CheckpointError(error)
    if args.resume == RESUME_AUTO:
        print(f"--resume auto: resuming from {resume}" if resume
              else "--resume auto: no checkpoint in --output_dir, starting fresh")
    return resume


def _eval_payload(coco_evaluator: Any) -> dict[str, Any]:
    """The bbox COCOeval `eval` dict (counts, date, precision, recall, scores) with arrays as
    tensors and params as plain lists, so it loads with weights_only=True."""
    def plain(value: Any) -> Any:  # numpy scalars inside lists (imgIds, catIds) would need pickling
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, (np.ndarray, np.generic)):
            return value.tolist()
        return value

    ev = coco_evaluator.coco_eval["bbox"].eval
    out: dict[str, Any] = {}
    for key, value in ev.items():
        if isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
        elif key == "params":
            out[key] = {k: plain(v) for k, v in vars(value).items()}
        else:
            out[key] = plain(value)
    return out


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:N): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; pass --device cpu")
    return device


def _make_loaders(args, dataset_train, dataset_val):
    if args.distributed:
        sampler_train = DistributedSampler(dataset_train, shuffle=True, seed=args.seed)
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_train = RandomSampler(dataset_train, generator=torch.Generator())
        sampler_val = SequentialSampler(dataset_val)
    if len(dataset_train) // args.world_size < args.batch_size and not args.eval:
        raise ValueError(f"the training set has {len(dataset_train)} images, fewer than --batch_size "
                         f"{args.batch_size} per process: no full batch (lower --batch_size)")
    batch_sampler_train = BatchSampler(sampler_train, args.batch_size, drop_last=True)
    loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler_train, collate_fn=collate_fn,
                              num_workers=args.num_workers, generator=torch.Generator())
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=args.num_workers)
    return sampler_train, loader_train, loader_val


def _seed_epoch(args, sampler_train, loader_train, epoch: int) -> None:
    """Every random stream of an epoch from (seed, rank, epoch) alone (see the module doc)."""
    seed_all(derived_seed(args.seed, args.rank, epoch))
    if isinstance(sampler_train, DistributedSampler):
        sampler_train.set_epoch(epoch)
    else:
        sampler_train.generator.manual_seed(derived_seed(args.seed, epoch, 1))
    loader_train.generator.manual_seed(derived_seed(args.seed, args.rank, epoch, 2))


def print_flags(args: argparse.Namespace) -> None:
    """The run's flags, one `name: value` line each, in the parser's order."""
    values = vars(args)
    width = max(map(len, values)) + 1
    print("flags:")
    for name, value in values.items():
        print(f"  {name + ':':<{width}} {value}")


def _selection_metric(stats: dict[str, Any]) -> tuple[str, float] | None:
    """(name, value) that checkpoint_best.pth is chosen by: PQ for panoptic runs, else box AP."""
    if "PQ_all" in stats:
        return "PQ", float(stats["PQ_all"]["pq"])
    if "coco_eval_bbox" in stats:
        return "bbox AP", float(stats["coco_eval_bbox"][0])
    return None


def _print_ap(stats: dict[str, Any], what: str) -> None:
    if "coco_eval_bbox" in stats:
        ap = stats["coco_eval_bbox"]
        print(f"{what}: bbox AP {ap[0]:.4f}  AP50 {ap[1]:.4f}  AP75 {ap[2]:.4f}")
    if "coco_eval_masks" in stats:
        print(f"{what}: mask AP {stats['coco_eval_masks'][0]:.4f}")
    if "PQ_all" in stats:
        print(f"{what}: PQ {stats['PQ_all']['pq']:.4f}")


# ---------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or with --eval evaluate) as the flags say; returns the last evaluation's stats."""
    dist_utils.init_distributed_mode(args)
    if args.frozen_weights and not args.masks:
        raise ValueError("--frozen_weights trains only the mask head: add --masks")
    if args.resume and args.resume != RESUME_AUTO and args.finetune:
        raise ValueError("--resume continues a run (weights, optimizer, epoch); --finetune starts a new one "
                         "from weights only: give one of them")
    if args.copy_paste < 0:
        raise ValueError(f"--copy_paste {args.copy_paste}: must be 0 (off) or a number of objects")
    if args.grad_accum_steps < 1:
        raise ValueError(f"--grad_accum_steps {args.grad_accum_steps}: must be 1 or more")
    device = _check_device(args.device)
    autocast_context(args.amp, device)  # refuses e.g. fp16 on CPU before any work
    if device.type == "cpu" and not args.no_malloc_tuning:
        allocator.retain_freed_memory()  # before the model and its activations are allocated
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and dist_utils.is_main_process():
        ensure_writable_dir(output_dir)
    args.resume = _resolve_resume(args, output_dir)
    if args.resume and args.finetune:  # --finetune X --resume auto: X started the run, which now continues
        print(f"--finetune {args.finetune} ignored: the run it started continues from {args.resume}")
        args.finetune = ""
    print_flags(args)

    seed_all(args.seed + dist_utils.get_rank())

    # Datasets first: they fix the class count and the panoptic thing ids the model needs.
    dataset_train = datasets.build_dataset("train", args)
    dataset_val = datasets.build_dataset("val", args)
    args.num_classes = datasets.infer_num_classes(args)
    args.thing_ids = datasets.panoptic_thing_ids(args)
    category_names = datasets.category_names(args)  # saved in checkpoints for predict.py

    # The checkpoint that provides the weights also says whether the backbone has frozen BN.
    resume_ckpt = load_checkpoint(args.resume) if args.resume else None
    frozen_ckpt = load_checkpoint(args.frozen_weights) if args.frozen_weights else None
    finetune_ckpt = load_checkpoint(args.finetune) if args.finetune else None
    weights_ckpt = resume_ckpt or frozen_ckpt or finetune_ckpt
    if weights_ckpt is not None:
        args.backbone_weights = "none" if _checkpoint_args_backbone(weights_ckpt) == "none" else "checkpoint"

    model, criterion, postprocessors = build_model(args)
    model.to(device)
    if not args.no_fast_train and args.amp == "off":
        # Checked to keep the fp32 loss within 1e-5 for the same dropout draws (tests/test_fast_paths.py);
        # under autocast the rounding differs anyway, so --amp keeps the model as built.
        optimize_for_training(model, sparse_dropout=not args.no_sparse_dropout)
    elif args.channels_last:
        to_channels_last(model)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)

    named = [(n, p) for n, p in model_without_ddp.named_parameters() if p.requires_grad]
    param_dicts = [
        {"params": [p for n, p in named if "backbone" not in n]},
        {"params": [p for n, p in named if "backbone" in n], "lr": args.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)
    scaler = make_grad_scaler(args.amp, device)

    sampler_train, loader_train, loader_val = _make_loaders(args, dataset_train, dataset_val)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    base_ds = datasets.evaluation_ground_truth(args, dataset_val)

    if frozen_ckpt is not None:
        load_model_state(model_without_ddp.detr, frozen_ckpt["model"], what=f"checkpoint {args.frozen_weights}")
    if finetune_ckpt is not None:
        _load_finetune(model_without_ddp, args.finetune, finetune_ckpt)
    best: dict[str, Any] | None = None  # {"metric", "value", "epoch"} of checkpoint_best.pth
    if resume_ckpt is not None:
        resumed_groups = getattr(resume_ckpt.get("args"), "group_detr", 1)
        if not args.eval and resumed_groups != args.group_detr:
            raise CheckpointError(f"--resume {args.resume} was trained with --group_detr {resumed_groups}, this run has "
                                  f"--group_detr {args.group_detr}: resume with --group_detr {resumed_groups}, or "
                                  "start a new run from its weights with --finetune")
        load_model_state(model_without_ddp, resume_ckpt["model"], what=f"checkpoint {args.resume}")
        if not args.eval and {"optimizer", "lr_scheduler", "epoch"} <= resume_ckpt.keys():
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            lr_scheduler.load_state_dict(resume_ckpt["lr_scheduler"])
            if scaler is not None and "scaler" in resume_ckpt:
                scaler.load_state_dict(resume_ckpt["scaler"])
            args.start_epoch = resume_ckpt["epoch"] + 1
            best = resume_ckpt.get("best")
            if "rng_state" in resume_ckpt:
                restore_rng_state(resume_ckpt["rng_state"])
    ema = ModelEMA(model_without_ddp, args.ema) if args.ema > 0 and not args.eval else None
    if ema is not None and resume_ckpt is not None and "ema" in resume_ckpt:
        ema.load_state_dict(resume_ckpt["ema"])
    del resume_ckpt, frozen_ckpt, finetune_ckpt, weights_ckpt

    if args.eval and args.fuse_eval:
        model = optimize_for_inference(model_without_ddp)  # eval only: these weights are never saved
    if args.compile:
        model = torch.compile(model)

    eval_kwargs = dict(amp=args.amp, backend=args.eval_backend, print_freq=args.print_freq,
                       print_all=args.print_all_losses)
    if args.eval:
        test_stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device,
                                              args.output_dir, **eval_kwargs)
        if output_dir is not None and coco_evaluator is not None and "bbox" in coco_evaluator.iou_types:
            save_checkpoint(_eval_payload(coco_evaluator), output_dir / "eval.pth")
        _print_ap(test_stats, "Evaluation")
        dist_utils.cleanup()
        return test_stats

    if output_dir is not None:
        _trim_log(output_dir, args.start_epoch)
    tb_writer = (TensorboardWriter(output_dir / "tensorboard")
                 if output_dir is not None and dist_utils.is_main_process() else None)
    print("Start training")
    start_time = time.time()
    test_stats: dict[str, Any] = {}
    for epoch in range(args.start_epoch, args.epochs):
        _seed_epoch(args, sampler_train, loader_train, epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                      amp=args.amp, scaler=scaler, print_freq=args.print_freq,
                                      tb_writer=tb_writer, tb_freq=args.tb_freq, ema=ema,
                                      print_all=args.print_all_losses, grad_accum_steps=args.grad_accum_steps)
        lr_scheduler.step()

        epoch_test_stats, coco_evaluator = {}, None
        last = epoch == args.epochs - 1
        if args.eval_every > 0 and ((epoch + 1) % args.eval_every == 0 or last):
            epoch_test_stats, coco_evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds,
                                                        device, args.output_dir, **eval_kwargs)
            test_stats = epoch_test_stats
            if ema is not None:
                ema_stats, _ = evaluate(ema.module, criterion, postprocessors, loader_val, base_ds, device,
                                        args.output_dir, **eval_kwargs)
                epoch_test_stats.update({f"ema_{k}": v for k, v in ema_stats.items()})
                _print_ap(ema_stats, f"EMA weights, epoch {epoch}")
        selection = _selection_metric(epoch_test_stats)
        improved = selection is not None and (best is None or selection[1] > best["value"])
        if improved:
            previous = f" (was {best['value']:.4f} at epoch {best['epoch']})" if best else ""
            best = {"metric": selection[0], "value": selection[1], "epoch": epoch}
            if output_dir is not None:
                print(f"New best {selection[0]} {selection[1]:.4f} at epoch {epoch}{previous}: checkpoint_best.pth")

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in epoch_test_stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters}
        if best is not None:  # test_best_<metric>: the key names what checkpoint_best.pth was chosen by
            log_stats.update({f"test_best_{best['metric'].replace(' ', '_')}": best["value"],
                              "test_best_epoch": best["epoch"]})
        if tb_writer is not None:
            tb_writer.add_scalars({k: v for k, v in log_stats.items() if k != "n_parameters"}, step=epoch)
        if output_dir is not None and dist_utils.is_main_process():
            # log.txt before checkpoint.pth: a run killed in between re-runs this epoch on
            # resume, and _trim_log drops the line it wrote.
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
            if coco_evaluator is not None and "bbox" in coco_evaluator.iou_types:
                payload = _eval_payload(coco_evaluator)
                (output_dir / "eval").mkdir(exist_ok=True)
                save_checkpoint(payload, output_dir / "eval" / "latest.pth")
                if epoch % 50 == 0:
                    save_checkpoint(payload, output_dir / "eval" / f"{epoch:03}.pth")
        if output_dir is not None:
            checkpoint = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args,
                          "rng_state": capture_rng_state(), "category_names": category_names, "best": best}
            if scaler is not None:
                checkpoint["scaler"] = scaler.state_dict()
            if ema is not None:
                checkpoint["ema"] = ema.state_dict()
                # The averaged weights alone: what predict.py, hubconf, --eval and export take.
                save_checkpoint({"model": ema.module.state_dict(), "epoch": epoch, "args": args,
                                 "category_names": category_names}, output_dir / "checkpoint_ema.pth")
            if improved:  # before checkpoint.pth: a kill in between re-runs the epoch, which rewrites it
                # Weights for predict.py / --finetune: no optimizer state (a third of the size for AdamW).
                keep = ("model", "epoch", "args", "category_names", "best")
                save_checkpoint({k: checkpoint[k] for k in keep}, output_dir / "checkpoint_best.pth")
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
                save_checkpoint(checkpoint, output_dir / f"checkpoint{epoch:04}.pth")
            save_checkpoint(checkpoint, output_dir / "checkpoint.pth")

    total = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total))}")
    _print_ap(test_stats, "Final evaluation")
    if tb_writer is not None:
        tb_writer.close()
    dist_utils.cleanup()
    return test_stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(usage="%(prog)s [options]", description="DETR training and evaluation script",
                                     parents=[get_args_parser()], formatter_class=HelpFormatter)
    cli_args = parser.parse_args()
    with exit_on_user_error(NonFiniteLossError):
        main(cli_args)
