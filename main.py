"""Train or evaluate DETR: flags -> checks -> datasets -> model -> weights -> loop -> run directory.

Run directory (--output_dir), as the original: checkpoint.pth every epoch, checkpointNNNN.pth
when (epoch + 1) is a multiple of --lr_drop or 100, log.txt (one JSON line per epoch),
eval/latest.pth and eval/NNN.pth (epoch % 50 == 0); eval.pth with --eval; plus TensorBoard
scalars in tensorboard/, and checkpoint_best.pth (model, args, epoch; no optimizer state),
rewritten when an evaluation beats every earlier one of the run (val box AP, PQ for panoptic;
log.txt's test_best_bbox_AP or test_best_PQ and test_best_epoch).

Exact resume: at the start of every epoch the Python, NumPy and torch generators are reseeded
from (seed, rank, epoch), the sampler's generator from (seed, epoch) and the DataLoader's worker
seeds from (seed, rank, epoch); so an epoch's data order, augmentation and dropout do not depend
on what ran before it, and "2 epochs" equals "1 epoch + --resume + 1 epoch" bit for bit on CPU,
with --num_workers 0 and also with workers (same --num_workers on both sides).
"""
from __future__ import annotations

import argparse
import datetime
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import datasets
from datasets.transforms import AUGMENTATIONS
from engine import AMP_MODES, NonFiniteLossError, autocast_context, evaluate, make_grad_scaler, train_one_epoch
from fast import optimize_for_inference, optimize_for_training, retain_freed_memory
from models import build_model
from util import distributed as dist_utils
from util.checkpoint import (RESUME_AUTO, CheckpointError, adapt_for_finetune, capture_rng_state,
                             ensure_writable_dir, fit_training_only, load_checkpoint, load_model_state,
                             restore_rng_state, resume_source, save_checkpoint)
from util.cli import HelpFormatter, exit_on_user_error, note_epoch
from util.device import resolve_device
from util.ema import ModelEMA
from util.finetune import init_class_prior, param_groups, set_frozen
from util.flag_types import (non_negative_float, non_negative_int, parse_flags, positive_float, positive_int,
                             probability, unit_interval)
from util.model_flags import add_criterion_flags, add_model_flags, check_model_flags
from util.nested_tensor import collate_fn
from util.run_lock import lock_run_folder
from util.run_log import append_log_line, prepare_log
from util.tensorboard import TensorboardWriter


# ---------------------------------------------------------------------------------------------
# Flags, group by group in the original's order


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag of the original main.py (same defaults) plus the project's own, in the original's
    groups; add_help=False so other scripts (run_with_submitit.py) can use it as a parent parser."""
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False)
    _add_optimisation_flags(parser)
    groups = add_model_flags(parser)
    groups["model"].add_argument("--frozen_weights", type=str, default=None,
                                 help="path/URL of a trained box model; only the mask head is trained (needs --masks)")
    _add_backbone_training_flags(groups["model: backbone"])
    add_criterion_flags(parser)
    _add_convergence_flags(parser)
    _add_dataset_flags(parser)
    _add_run_flags(parser)
    _add_speed_flags(parser)
    dist = parser.add_argument_group("distributed")
    dist.add_argument("--world_size", default=1, type=positive_int, help="number of distributed processes")
    dist.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    return parser


def _add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", default=1e-4, type=positive_float, help="AdamW learning rate outside the backbone")
    optim.add_argument("--lr_backbone", default=1e-5, type=float,
                       help="backbone learning rate; 0 or less freezes the backbone")
    optim.add_argument("--batch_size", default=2, type=positive_int, help="images per process")
    optim.add_argument("--grad_accum_steps", default=1, type=positive_int,
                       help="optimizer step every N batches, the loss normalised as for one batch of N x "
                            "--batch_size images (effective batch N x batch_size x processes)")
    optim.add_argument("--weight_decay", default=1e-4, type=non_negative_float, help="AdamW weight decay")
    optim.add_argument("--epochs", default=300, type=non_negative_int, help="total epochs")
    optim.add_argument("--lr_drop", default=200, type=positive_int, help="StepLR step size in epochs (lr x0.1)")
    optim.add_argument("--clip_max_norm", default=0.1, type=non_negative_float,
                       help="gradient clipping max norm; 0 disables")


def _add_backbone_training_flags(backbone: argparse._ArgumentGroup) -> None:
    backbone.add_argument("--backbone_weights", default="imagenet", type=str,
                          help="'imagenet' (torchvision file in the torch hub cache), 'none' (random init, "
                               "trainable BatchNorm) or a path; ignored when --resume/--frozen_weights/--finetune "
                               "provide the weights")
    backbone.add_argument("--trainable_backbone_layers", default=3, type=int, choices=range(6), metavar="0..5",
                          help="ResNet stages trained, from layer4 down (3: layer2-4 as in the original; 5 "
                               "adds layer1 and the stem, for a backbone trained from scratch); with "
                               "--lr_backbone 0 none are")


def _add_convergence_flags(parser: argparse.ArgumentParser) -> None:
    fast_group = parser.add_argument_group(
        "faster convergence (training only: the inference model stays the plain DETR)")
    fast_group.add_argument("--group_detr", default=1, type=positive_int,
                            help="Group DETR: K groups of --num_queries queries, each matched one-to-one, "
                                 "self-attention inside each group; evaluation and inference use group 0 "
                                 "(1 = the original)")
    fast_group.add_argument("--ema", default=0.0, type=probability,
                            help="decay of an exponential moving average of the weights (e.g. 0.999; 0 = off): "
                                 "evaluated beside the raw weights (test_ema_* in log.txt), saved as "
                                 "checkpoint_ema.pth")
    fast_group.add_argument("--mosaic", default=0.0, type=unit_interval, metavar="P",
                            help="probability that a training image becomes a 2x2 mosaic of four (boxes only "
                                 "needed; 0 = off)")
    fast_group.add_argument("--box_paste", default=0, type=non_negative_int, metavar="N",
                            help="paste the box rectangles of up to N objects of another training image where they "
                                 "overlap no box (boxes only needed; 0 = off)")
    fast_group.add_argument("--aug_off_epochs", default=0, type=non_negative_int, metavar="K",
                            help="turn --mosaic, --box_paste and --copy_paste off for the last K epochs")
    fast_group.add_argument("--head_lr_mult", default=1.0, type=positive_float,
                            help="learning rate of the class head and the query embeddings = --lr x this (1 = as "
                                 "the rest; a fresh head from --finetune learns faster with more)")
    fast_group.add_argument("--class_prior", default=0.0, type=probability, metavar="P",
                            help="initial class-head bias: softmax 1 - P for no object, P shared by the dataset's "
                                 "categories (e.g. objects per image / --num_queries; 0 = off); applies to a head "
                                 "not loaded from a checkpoint")
    fast_group.add_argument("--freeze_backbone_epochs", default=0, type=non_negative_int, metavar="N",
                            help="train everything but the backbone for the first N epochs (0 = off)")


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
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
    data.add_argument("--shapes_train_size", default=256, type=positive_int, help="shapes: training images")
    data.add_argument("--shapes_val_size", default=64, type=positive_int, help="shapes: validation images")
    data.add_argument("--shapes_image_size", default=128, type=positive_int,
                      help="shapes: longer image side in pixels")
    data.add_argument("--train_images", type=str, help="custom: training image folder")
    data.add_argument("--train_annotations", type=str, help="custom: training COCO-format JSON")
    data.add_argument("--val_images", type=str, help="custom: validation image folder")
    data.add_argument("--val_annotations", type=str, help="custom: validation COCO-format JSON")
    data.add_argument("--image_scale", default=1.0, type=positive_float,
                      help="multiplies every image size of the augmentation recipe")
    data.add_argument("--augment", default="detr", choices=AUGMENTATIONS,
                      help="training augmentation: detr = the original's (flip, multi-scale, crop); "
                           "flip = flip + the val resize; none = the val transform")
    data.add_argument("--copy_paste", default=0, type=non_negative_int, metavar="N",
                      help="training only: paste up to N objects cut along their polygons out of another "
                           "training image into each one (Simple Copy-Paste); 0 = off, the original")
    data.add_argument("--num_workers", default=2, type=non_negative_int, help="DataLoader worker processes")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="", help="where to save; empty = save nothing")
    run.add_argument("--device", default="cuda", help="device for training/testing (cuda, cuda:N, cpu)")
    run.add_argument("--seed", default=42, type=non_negative_int, help="seed; each process adds its rank")
    run.add_argument("--resume", default="", help="checkpoint path or https/file URL to resume from; 'auto': "
                     "--output_dir's checkpoint.pth if there is one, else start fresh")
    run.add_argument("--overwrite", action="store_true",
                     help="start a fresh run even if --output_dir holds a checkpoint (refused without it)")
    run.add_argument("--finetune", default="", help="checkpoint path/URL whose weights start a fresh run "
                     "(epoch 0, new optimizer; class head/queries of another shape re-initialised)")
    run.add_argument("--start_epoch", default=0, type=non_negative_int, metavar="N",
                     help="first epoch (a --resume checkpoint sets it)")
    run.add_argument("--eval", action="store_true", help="evaluate only")
    run.add_argument("--eval_every", default=1, type=non_negative_int,
                     help="evaluate every N epochs during training (and after the last); 0 = never")
    run.add_argument("--eval_backend", default="pycocotools", choices=("pycocotools", "faster"),
                     help="COCO evaluation: pycocotools, or faster-coco-eval (same numbers)")
    run.add_argument("--amp", default="off", choices=AMP_MODES,
                     help="autocast dtype for the forward pass (fp16 needs CUDA)")
    run.add_argument("--print_freq", default=10, type=non_negative_int,
                     help="console progress line every N iterations; 0 = none")
    run.add_argument("--print_all_losses", action="store_true",
                     help="progress line with every loss term (scaled, unscaled, auxiliary), as the original; "
                          "log.txt always has them all")
    run.add_argument("--tb_freq", default=50, type=non_negative_int,
                     help="TensorBoard loss every N iterations; 0 = per-epoch scalars only")


def _add_speed_flags(parser: argparse.ArgumentParser) -> None:
    speed = parser.add_argument_group("speed", "the fast paths of fast/ and their opt-outs")
    speed.add_argument("--no_fast_train", action="store_true",
                       help="train the model as built, not through fast.optimize_for_training (BatchNorm "
                            "inside the convolutions, channels_last, sparse CPU dropout; default with --amp off)")
    speed.add_argument("--no_sparse_dropout", action="store_true",
                       help="keep torch's dropout on the fast path: the draws --no_fast_train makes for a seed")
    speed.add_argument("--no_malloc_tuning", action="store_true",
                       help="leave glibc malloc as it is; by default, on the CPU, freed memory stays in the "
                            "process for the next step to reuse")
    speed.add_argument("--fuse_eval", action="store_true",
                       help="with --eval: run fast.optimize_for_inference (BatchNorm folded, channels_last)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model for train and eval")


# ---------------------------------------------------------------------------------------------
# Seeding


def derived_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (seed, rank, epoch, ...); distinct tuples rarely collide."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_epoch(args, sampler_train, loader_train, epoch: int) -> None:
    """Every random stream of an epoch from (seed, rank, epoch) alone (see the module doc)."""
    seed_all(derived_seed(args.seed, args.rank, epoch))
    if isinstance(sampler_train, DistributedSampler):
        sampler_train.set_epoch(epoch)
    else:
        sampler_train.generator.manual_seed(derived_seed(args.seed, epoch, 1))
    loader_train.generator.manual_seed(derived_seed(args.seed, args.rank, epoch, 2))


# ---------------------------------------------------------------------------------------------
# Step 1: checks (before any work) and the run directory


def check_flags(args: argparse.Namespace) -> torch.device:
    """Refuse flag combinations that cannot run, naming the flags; returns the device."""
    if args.frozen_weights and not args.masks:
        raise ValueError("--frozen_weights trains only the mask head: add --masks")
    if args.resume and args.resume != RESUME_AUTO and args.finetune:
        raise ValueError("--resume continues a run (weights, optimizer, epoch); --finetune starts a new one "
                         "from weights only: give one of them")
    if args.resume == RESUME_AUTO and args.overwrite:
        raise ValueError("--resume auto continues the run in --output_dir, --overwrite starts it afresh: "
                         "give one of them")
    if args.epochs == 0 and not args.eval:
        raise ValueError("--epochs 0 trains nothing: give --epochs 1 or more, or --eval to evaluate")
    if args.freeze_backbone_epochs and args.distributed:
        raise ValueError(f"--freeze_backbone_epochs {args.freeze_backbone_epochs}: must be 0 with several "
                         "processes (DDP needs the same trainable parameters throughout)")
    check_model_flags(args)
    device = resolve_device(args.device)
    autocast_context(args.amp, device)  # refuses e.g. fp16 on CPU before any work
    return device


def prepare_output_dir(args: argparse.Namespace) -> Path | None:
    """--output_dir made writable, and --resume settled (auto -> a path or fresh); None: save nothing."""
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and dist_utils.is_main_process():
        ensure_writable_dir(output_dir)
    args.resume = _resolve_resume(args, output_dir)
    if args.resume and args.finetune:  # --finetune X --resume auto: X started the run, which now continues
        print(f"--finetune {args.finetune} ignored: the run it started continues from {args.resume}")
        args.finetune = ""
    return output_dir


def _resolve_resume(args, output_dir: Path | None) -> str:
    """util.checkpoint.resume_source decided by rank 0 for every process, so all ranks resume
    from the same epoch (or all refuse) even if they saw the folder at different moments.
    Rank 0 first takes the folder (util/run_lock.py): a second run into it is refused. --eval
    writes eval.pth only, which training never writes, so it shares the folder (panoptic eval
    writes panoptic_eval/, as training's evaluation does: it takes the folder)."""
    decision = ("", "")
    if dist_utils.is_main_process():
        try:
            if output_dir is not None and (not args.eval or args.dataset_file == "coco_panoptic"):
                lock_run_folder(output_dir)
            decision = (resume_source(args.resume, output_dir, overwrite=args.overwrite, training=not args.eval), "")
        except (CheckpointError, OSError) as err:
            decision = ("", str(err))
    resume, error = dist_utils.all_gather(decision)[0]
    if error:
        raise CheckpointError(error)
    if args.resume == RESUME_AUTO:
        print(f"--resume auto: resuming from {resume}" if resume
              else "--resume auto: no checkpoint in --output_dir, starting fresh")
    return resume


def print_flags(args: argparse.Namespace) -> None:
    """The run's flags, one `name: value` line each, in the parser's order."""
    values = vars(args)
    width = max(map(len, values)) + 1
    print("flags:")
    for name, value in values.items():
        print(f"  {name + ':':<{width}} {value}")


# ---------------------------------------------------------------------------------------------
# Step 2: data


def build_datasets(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(train, val, category names); they also fix the class count and the panoptic thing ids the model needs."""
    dataset_train = datasets.build_dataset("train", args)
    dataset_val = datasets.build_dataset("val", args)
    args.num_classes = datasets.infer_num_classes(args)
    args.thing_ids = datasets.panoptic_thing_ids(args)
    category_names = datasets.category_names(args)  # saved in checkpoints for predict.py
    return dataset_train, dataset_val, category_names


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


# ---------------------------------------------------------------------------------------------
# Step 3: model and optimizer


def load_checkpoints(args: argparse.Namespace) -> dict[str, dict | None]:
    """The --resume, --frozen_weights and --finetune checkpoints (None where not given). The one that
    provides the weights also says whether the backbone has frozen BatchNorm."""
    loaded = {flag: load_checkpoint(source) if source else None
              for flag, source in (("resume", args.resume), ("frozen_weights", args.frozen_weights),
                                   ("finetune", args.finetune))}
    weights = loaded["resume"] or loaded["frozen_weights"] or loaded["finetune"]
    if weights is not None:
        trained_with = getattr(weights.get("args"), "backbone_weights", "imagenet")
        args.backbone_weights = "none" if trained_with == "none" else "checkpoint"
    return loaded


def build_training_model(args: argparse.Namespace, device: torch.device,
                         category_names: Any) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, dict]:
    """(model to run, the same without DDP, criterion, postprocessors), on `device`, fast path applied."""
    model, criterion, postprocessors = build_model(args)
    if args.class_prior:  # before any weights load: a checkpoint's head replaces it, a re-initialised one keeps it
        init_class_prior(model, args.class_prior, category_names)
    model.to(device)
    if not args.no_fast_train and args.amp == "off":
        # Checked to keep the fp32 loss within 1e-5 for the same dropout draws (tests/test_fast_paths.py);
        # under autocast the rounding differs anyway, so --amp keeps the model as built.
        optimize_for_training(model, sparse_dropout=not args.no_sparse_dropout)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
        model_without_ddp = model.module
    return model, model_without_ddp, criterion, postprocessors


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, device: torch.device) -> tuple[Any, Any, Any]:
    """(AdamW over the trainable parameters in the original's groups, StepLR, grad scaler or None)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    param_dicts = param_groups(named, args.lr_backbone,
                               head_lr=args.lr * args.head_lr_mult if args.head_lr_mult != 1 else None)
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    return optimizer, lr_scheduler, make_grad_scaler(args.amp, device)


# ---------------------------------------------------------------------------------------------
# Step 4: weights


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


def _resume(args: argparse.Namespace, model: torch.nn.Module, optimizer, lr_scheduler, scaler,
            checkpoint: dict) -> dict[str, Any] | None:
    """Weights, and when training, optimizer/scheduler/scaler/epoch/RNG state; returns the run's best so far."""
    resumed_groups = getattr(checkpoint.get("args"), "group_detr", 1)
    if not args.eval and resumed_groups != args.group_detr:
        raise CheckpointError(f"--resume {args.resume} was trained with --group_detr {resumed_groups}, this run has "
                              f"--group_detr {args.group_detr}: resume with --group_detr {resumed_groups}, or "
                              "start a new run from its weights with --finetune")
    load_model_state(model, checkpoint["model"], what=f"checkpoint {args.resume}")
    if args.eval or not {"optimizer", "lr_scheduler", "epoch"} <= checkpoint.keys():
        return None
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    args.start_epoch = checkpoint["epoch"] + 1
    if "rng_state" in checkpoint:
        restore_rng_state(checkpoint["rng_state"])
    return checkpoint.get("best")


def restore_weights(args: argparse.Namespace, model: torch.nn.Module, optimizer, lr_scheduler, scaler,
                    checkpoints: dict[str, dict | None]) -> tuple[dict[str, Any] | None, ModelEMA | None]:
    """Load --frozen_weights, --finetune, --resume into `model` (without DDP) and the optimizer;
    returns (best evaluation so far {"metric", "value", "epoch"} or None, the EMA or None)."""
    if checkpoints["frozen_weights"] is not None:
        load_model_state(model.detr, checkpoints["frozen_weights"]["model"],
                         what=f"checkpoint {args.frozen_weights}")
    if checkpoints["finetune"] is not None:
        _load_finetune(model, args.finetune, checkpoints["finetune"])
    resumed = checkpoints["resume"]
    best = _resume(args, model, optimizer, lr_scheduler, scaler, resumed) if resumed is not None else None
    ema = ModelEMA(model, args.ema) if args.ema > 0 and not args.eval else None
    if ema is not None and resumed is not None and "ema" in resumed:
        ema.load_state_dict(resumed["ema"])
    return best, ema


def model_to_run(args: argparse.Namespace, model: torch.nn.Module, model_without_ddp: torch.nn.Module) -> Any:
    """The model the loop calls: folded for --eval --fuse_eval, compiled with --compile."""
    if args.eval and args.fuse_eval:
        model = optimize_for_inference(model_without_ddp)  # eval only: these weights are never saved
    if args.compile:
        model = torch.compile(model)
    return model


# ---------------------------------------------------------------------------------------------
# Step 5: the loop (or one evaluation), and what it saves


@dataclass
class Training:
    """What the training loop works with, built by the steps above."""
    model: Any  # what runs: DDP-wrapped, compiled
    model_without_ddp: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Any
    ema: ModelEMA | None
    best: dict[str, Any] | None
    sampler_train: Any
    loader_train: DataLoader
    dataset_train: Any
    evaluate: Callable[[Any], tuple[dict[str, Any], Any]]  # model -> (stats, COCO evaluator)
    device: torch.device
    output_dir: Path | None
    category_names: Any
    n_parameters: int


def evaluate_only(model: Any, run_evaluation: Callable, output_dir: Path | None) -> dict[str, Any]:
    """--eval: one evaluation; eval.pth in --output_dir."""
    test_stats, coco_evaluator = run_evaluation(model)
    if output_dir is not None and coco_evaluator is not None and "bbox" in coco_evaluator.iou_types:
        save_checkpoint(_eval_payload(coco_evaluator), output_dir / "eval.pth")
    _print_ap(test_stats, "Evaluation")
    return test_stats


def train(args: argparse.Namespace, t: Training) -> dict[str, Any]:
    """Epochs --start_epoch .. --epochs - 1: train, evaluate as --eval_every says, log, save."""
    if t.output_dir is not None and dist_utils.is_main_process():
        if args.overwrite and not args.resume:
            # Only now, once flags, data and weights passed every check: the old run's best and
            # averaged weights are not this run's and must not outlive the restart.
            (t.output_dir / "checkpoint_best.pth").unlink(missing_ok=True)
            (t.output_dir / "checkpoint_ema.pth").unlink(missing_ok=True)
        prepare_log(t.output_dir, args.start_epoch)
    tb_writer = (TensorboardWriter(t.output_dir / "tensorboard")
                 if t.output_dir is not None and dist_utils.is_main_process() else None)
    print("Start training")
    start_time = time.time()
    test_stats: dict[str, Any] = {}
    for epoch in range(args.start_epoch, args.epochs):
        note_epoch(epoch, t.output_dir)  # what an interrupt reports
        _seed_epoch(args, t.sampler_train, t.loader_train, epoch)
        datasets.object_augment.set_epoch(t.dataset_train, epoch, args)
        if args.freeze_backbone_epochs:
            set_frozen(t.optimizer.param_groups[1]["params"], epoch < args.freeze_backbone_epochs)
        train_stats = train_one_epoch(t.model, t.criterion, t.loader_train, t.optimizer, t.device, epoch,
                                      args.clip_max_norm, amp=args.amp, scaler=t.scaler, print_freq=args.print_freq,
                                      tb_writer=tb_writer, tb_freq=args.tb_freq, ema=t.ema,
                                      print_all=args.print_all_losses, grad_accum_steps=args.grad_accum_steps)
        t.lr_scheduler.step()
        epoch_test_stats, coco_evaluator = _evaluate_epoch(args, t, epoch)
        test_stats = epoch_test_stats or test_stats
        improved = _update_best(t, epoch_test_stats, epoch)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in epoch_test_stats.items()},
                     "epoch": epoch, "n_parameters": t.n_parameters}
        if t.best is not None:  # test_best_<metric>: the key names what checkpoint_best.pth was chosen by
            log_stats.update({f"test_best_{t.best['metric'].replace(' ', '_')}": t.best["value"],
                              "test_best_epoch": t.best["epoch"]})
        if tb_writer is not None:
            tb_writer.add_scalars({k: v for k, v in log_stats.items() if k != "n_parameters"}, step=epoch)
        if t.output_dir is not None and dist_utils.is_main_process():
            _write_log_and_eval(t.output_dir, log_stats, coco_evaluator, epoch)
        if t.output_dir is not None:
            _save_checkpoints(args, t, epoch, improved)
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    _print_ap(test_stats, "Final evaluation")
    if tb_writer is not None:
        tb_writer.close()
    return test_stats


def _evaluate_epoch(args: argparse.Namespace, t: Training, epoch: int) -> tuple[dict[str, Any], Any]:
    """This epoch's evaluation (EMA weights' stats as ema_*), or ({}, None) when --eval_every skips it."""
    last = epoch == args.epochs - 1
    if not (args.eval_every > 0 and ((epoch + 1) % args.eval_every == 0 or last)):
        return {}, None
    stats, coco_evaluator = t.evaluate(t.model)
    if t.ema is not None:
        ema_stats, _ = t.evaluate(t.ema.module)
        stats.update({f"ema_{k}": v for k, v in ema_stats.items()})
        _print_ap(ema_stats, f"EMA weights, epoch {epoch}")
    return stats, coco_evaluator


def _selection_metric(stats: dict[str, Any]) -> tuple[str, float] | None:
    """(name, value) that checkpoint_best.pth is chosen by: PQ for panoptic runs, else box AP."""
    if "PQ_all" in stats:
        return "PQ", float(stats["PQ_all"]["pq"])
    if "coco_eval_bbox" in stats:
        return "bbox AP", float(stats["coco_eval_bbox"][0])
    return None


def _update_best(t: Training, stats: dict[str, Any], epoch: int) -> bool:
    """Whether this epoch's evaluation beats every earlier one of the run (then t.best is updated)."""
    selection = _selection_metric(stats)
    if selection is None or (t.best is not None and selection[1] <= t.best["value"]):
        return False
    previous = f" (was {t.best['value']:.4f} at epoch {t.best['epoch']})" if t.best else ""
    t.best = {"metric": selection[0], "value": selection[1], "epoch": epoch}
    if t.output_dir is not None:
        print(f"New best {selection[0]} {selection[1]:.4f} at epoch {epoch}{previous}: checkpoint_best.pth")
    return True


def _write_log_and_eval(output_dir: Path, log_stats: dict[str, Any], coco_evaluator: Any, epoch: int) -> None:
    """log.txt's line for the epoch, then eval/latest.pth (and eval/NNN.pth every 50 epochs).

    log.txt before checkpoint.pth: a run killed in between re-runs this epoch on resume, and
    prepare_log drops the line it wrote."""
    append_log_line(output_dir, log_stats)
    if coco_evaluator is not None and "bbox" in coco_evaluator.iou_types:
        payload = _eval_payload(coco_evaluator)
        (output_dir / "eval").mkdir(exist_ok=True)
        save_checkpoint(payload, output_dir / "eval" / "latest.pth")
        if epoch % 50 == 0:
            save_checkpoint(payload, output_dir / "eval" / f"{epoch:03}.pth")


def _save_checkpoints(args: argparse.Namespace, t: Training, epoch: int, improved: bool) -> None:
    """checkpoint.pth (and checkpointNNNN.pth), checkpoint_ema.pth, checkpoint_best.pth when improved."""
    checkpoint = {"model": t.model_without_ddp.state_dict(), "optimizer": t.optimizer.state_dict(),
                  "lr_scheduler": t.lr_scheduler.state_dict(), "epoch": epoch, "args": args,
                  "rng_state": capture_rng_state(), "category_names": t.category_names, "best": t.best}
    if t.scaler is not None:
        checkpoint["scaler"] = t.scaler.state_dict()
    if t.ema is not None:
        checkpoint["ema"] = t.ema.state_dict()
        # The averaged weights alone: what predict.py, hubconf, --eval and export take.
        save_checkpoint({"model": t.ema.module.state_dict(), "epoch": epoch, "args": args,
                         "category_names": t.category_names}, t.output_dir / "checkpoint_ema.pth")
    if improved:  # before checkpoint.pth: a kill in between re-runs the epoch, which rewrites it
        # Weights for predict.py / --finetune: no optimizer state.
        keep = ("model", "epoch", "args", "category_names", "best")
        save_checkpoint({k: checkpoint[k] for k in keep}, t.output_dir / "checkpoint_best.pth")
    if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
        save_checkpoint(checkpoint, t.output_dir / f"checkpoint{epoch:04}.pth")
    save_checkpoint(checkpoint, t.output_dir / "checkpoint.pth")


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
    device = check_flags(args)
    if device.type == "cpu" and not args.no_malloc_tuning:
        retain_freed_memory()  # before the model and its activations are allocated
    output_dir = prepare_output_dir(args)
    print_flags(args)
    seed_all(args.seed + dist_utils.get_rank())

    dataset_train, dataset_val, category_names = build_datasets(args)
    checkpoints = load_checkpoints(args)
    model, model_without_ddp, criterion, postprocessors = build_training_model(args, device, category_names)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)
    optimizer, lr_scheduler, scaler = build_optimizer(args, model_without_ddp, device)
    sampler_train, loader_train, loader_val = _make_loaders(args, dataset_train, dataset_val)
    base_ds = datasets.evaluation_ground_truth(args, dataset_val)

    best, ema = restore_weights(args, model_without_ddp, optimizer, lr_scheduler, scaler, checkpoints)
    del checkpoints
    model = model_to_run(args, model, model_without_ddp)

    def run_evaluation(evaluated: Any) -> tuple[dict[str, Any], Any]:
        return evaluate(evaluated, criterion, postprocessors, loader_val, base_ds, device, args.output_dir,
                        amp=args.amp, backend=args.eval_backend, print_freq=args.print_freq,
                        print_all=args.print_all_losses)

    if args.eval:
        stats = evaluate_only(model, run_evaluation, output_dir)
    else:
        stats = train(args, Training(model, model_without_ddp, criterion, optimizer, lr_scheduler, scaler, ema, best,
                                     sampler_train, loader_train, dataset_train, run_evaluation, device, output_dir,
                                     category_names, n_parameters))
    dist_utils.cleanup()
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(usage="%(prog)s [options]", description="DETR training and evaluation script",
                                     parents=[get_args_parser()], formatter_class=HelpFormatter)
    with exit_on_user_error(NonFiniteLossError):
        main(parse_flags(parser))
