"""One training epoch and one evaluation pass.

- `train_one_epoch`: forward (optionally under autocast), loss weighted by
  `criterion.weight_dict`, a finiteness check before any weight changes, backward, gradient
  clipping, optimizer step (after --grad_accum_steps micro-batches). Returns the epoch's
  averaged stats (loss, loss_ce, loss_bbox, ..., class_error, lr), as the original.
- `evaluate`: inference-mode pass over the validation loader feeding CocoEvaluator (bbox, segm)
  and PanopticEvaluator; returns (stats, coco_evaluator) with `coco_eval_bbox` (12 numbers),
  `coco_eval_masks`, and `PQ_all`/`PQ_th`/`PQ_st` for panoptic.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterable, Iterator

import torch

from util.distributed import get_world_size, reduce_dict
from util.metric_logger import MetricLogger, SmoothedValue

AMP_MODES = ("off", "bf16", "fp16")
# The console progress line's meters (those present); log.txt and the returned stats keep every
# term (scaled, unscaled, auxiliary), and print_all=True prints them all as the original did.
PROGRESS_METERS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "class_error", "lr")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; raised before the optimizer could corrupt the weights."""


def autocast_context(amp: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """torch.autocast for --amp bf16/fp16 on `device`, or a no-op for 'off'.

    fp16 autocast is CUDA-only here (it needs GradScaler, which is for CUDA); on CPU use bf16.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"--amp {amp!r}: choose one of {', '.join(AMP_MODES)}")
    if amp == "off":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if amp == "fp16" and device_type != "cuda":
        raise ValueError(f"--amp fp16 needs a CUDA device (got --device {device}); use --amp bf16 on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def make_grad_scaler(amp: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for --amp fp16 (gradients of fp16 activations underflow without it), else None."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def _to_float(outputs: Any) -> Any:
    """Cast every floating tensor of the model outputs (dicts, lists) to fp32 for the loss."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs


def _targets_to(targets: Iterable[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]


def _image_ids(targets: list[dict]) -> list[int]:
    return [int(t["image_id"].reshape(-1)[0]) for t in targets if "image_id" in t]


def _groups(batches: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last one may be shorter)."""
    group: list = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def accumulated_num_boxes(targets: list[dict], micro_batches: int, device: torch.device) -> float:
    """Box/mask loss normaliser for each of `micro_batches` micro-batches whose targets together
    are `targets`: the whole accumulated batch's boxes averaged over processes (at least 1, as
    SetCriterion's own), divided by micro_batches. Each micro-batch's loss is also divided by
    micro_batches, so the summed gradients are those of one batch of all the images."""
    count = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = get_world_size()
    if world_size > 1:
        torch.distributed.all_reduce(count)
    return torch.clamp(count / world_size, min=1).item() / micro_batches


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device | str, epoch: int,
                    max_norm: float = 0, *, amp: str = "off", scaler: torch.amp.GradScaler | None = None,
                    print_freq: int = 10, tb_writer: Any = None, tb_freq: int = 50,
                    ema: Any = None, print_all: bool = False, grad_accum_steps: int = 1) -> dict[str, float]:
    """Train `model` for one pass over `data_loader` ((NestedTensor, targets) batches).

    amp: 'off' | 'bf16' | 'fp16' autocast for the forward pass (the loss is computed in fp32);
    scaler: a GradScaler (needed for fp16). max_norm > 0 clips the gradient norm.
    grad_accum_steps N: one optimizer step per N loader batches (micro-batches), with the loss
    normalised as for one batch of all their images (`accumulated_num_boxes`); under DDP the
    gradients are all-reduced on the last micro-batch only (`no_sync` before it). Statistics
    and iteration numbers count micro-batches.
    tb_writer (util.tensorboard.TensorboardWriter) receives the loss every `tb_freq` iterations
    at step epoch * len(data_loader) + iteration. ema (util.ema.ModelEMA) is updated after every
    optimizer step. print_all: every loss term on the console progress line, not only PROGRESS_METERS.
    Returns {stat: epoch average}. Raises NonFiniteLossError (epoch, iteration, each loss term,
    the batch's image ids) before the step that would have used a NaN/inf loss.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"--grad_accum_steps {grad_accum_steps}: must be 1 or more")
    device = torch.device(device)
    model.train()
    criterion.train()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    header = f"Epoch: [{epoch}]"
    weight_dict = criterion.weight_dict
    steps_per_epoch = len(data_loader) if hasattr(data_loader, "__len__") else 0

    shown = None if print_all else PROGRESS_METERS
    iteration = -1
    for group in _groups(logger.log_every(data_loader, print_freq, header, shown), grad_accum_steps):
        num_boxes = None
        if grad_accum_steps > 1:
            group_targets = [t for _, targets in group for t in targets]
            num_boxes = accumulated_num_boxes(group_targets, len(group), device)
            group_boxes = sum(len(t["labels"]) for t in group_targets)  # this process's, for the CE
        optimizer.zero_grad()
        for position, (samples, targets) in enumerate(group):
            iteration += 1
            samples = samples.to(device)
            targets = _targets_to(targets, device)
            last = position == len(group) - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast_context(amp, device):
                    outputs = model(samples)
                if num_boxes is None:
                    loss_dict = criterion(_to_float(outputs), targets)
                else:  # both normalisers of the whole accumulated batch (this process's part for the CE)
                    class_weight = criterion.class_weight_sum(
                        len(group_targets), group_boxes, outputs["pred_logits"].shape[1]) / len(group)
                    loss_dict = criterion(_to_float(outputs), targets, num_boxes=num_boxes, class_weight=class_weight)
                losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

                # Averaged over processes, so every rank takes the same decision below.
                reduced = reduce_dict({k: v.detach() for k, v in loss_dict.items()})
                reduced_scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
                reduced_unscaled = {f"{k}_unscaled": v for k, v in reduced.items()}
                loss_value = sum(float(v) for v in reduced_scaled.values())

                if not math.isfinite(loss_value) or not torch.isfinite(losses).all():
                    terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in loss_dict.items())
                    raise NonFiniteLossError(
                        f"non-finite loss {loss_value} at epoch {epoch}, iteration {iteration}: {terms}; "
                        f"image ids of the batch: {_image_ids(targets)}. Training stopped before the optimizer "
                        "step; the last checkpoint is untouched. Lower --lr, keep --clip_max_norm > 0, or check "
                        "these images' annotations"
                    )
                if len(group) > 1:
                    losses = losses / len(group)
                (scaler.scale(losses) if scaler is not None else losses).backward()

            logger.update(loss=loss_value, **reduced_scaled, **reduced_unscaled)
            if "class_error" in reduced:
                logger.update(class_error=reduced["class_error"])
            logger.update(lr=optimizer.param_groups[0]["lr"])
            if tb_writer is not None and tb_freq > 0 and iteration % tb_freq == 0:
                tb_writer.add_scalars({"train_loss": loss_value,
                                       **{f"train_{k}": float(v) for k, v in reduced_scaled.items()}},
                                      step=epoch * steps_per_epoch + iteration, prefix="iter")

        if scaler is not None:
            if max_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
        if ema is not None:
            ema.update()

    logger.synchronize_between_processes()
    print("Averaged stats:", logger.format(shown))
    return {name: meter.global_avg for name, meter in logger.meters.items()}


def _has_segmentation(coco_gt: Any) -> bool:
    annotations = coco_gt.dataset.get("annotations", [])
    return all("segmentation" in a for a in annotations)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, criterion: torch.nn.Module, postprocessors: dict[str, Any],
             data_loader: Iterable, base_ds: Any, device: torch.device | str, output_dir: str,
             *, amp: str = "off", backend: str = "pycocotools", print_freq: int = 10,
             print_all: bool = False) -> tuple[dict[str, Any], Any]:
    """Validation losses and COCO / panoptic metrics.

    postprocessors: {'bbox': PostProcess, optional 'segm', optional 'panoptic'}; base_ds: the
    pycocotools COCO ground truth (None skips COCO evaluation). Panoptic PNGs go to
    `output_dir/panoptic_eval` (or ./panoptic_eval when output_dir is empty).
    Returns (stats, coco_evaluator): stats holds the averaged losses, `coco_eval_bbox` and
    `coco_eval_masks` (12 numbers each) and `PQ_all`/`PQ_th`/`PQ_st` (dicts pq, sq, rq, n).
    """
    from datasets.coco_eval import CocoEvaluator
    from datasets.panoptic_eval import PanopticEvaluator

    device = torch.device(device)
    model.eval()
    criterion.eval()
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    weight_dict = criterion.weight_dict

    iou_types = tuple(k for k in ("segm", "bbox") if k in postprocessors)
    if "segm" in iou_types and base_ds is not None and not _has_segmentation(base_ds):
        # Panoptic ground truth as COCO boxes (no per-instance masks): masks are scored by PQ.
        print("segm evaluation skipped: the ground truth has no instance segmentation; see PQ")
        iou_types = tuple(k for k in iou_types if k != "segm")
    coco_evaluator = CocoEvaluator(base_ds, iou_types, backend=backend) if base_ds is not None and iou_types else None
    panoptic_evaluator = None
    if "panoptic" in postprocessors:
        dataset = data_loader.dataset
        panoptic_evaluator = PanopticEvaluator(dataset.ann_file, dataset.ann_folder,
                                               output_dir=os.path.join(output_dir or ".", "panoptic_eval"))

    shown = None if print_all else PROGRESS_METERS
    for samples, targets in logger.log_every(data_loader, print_freq, "Test:", shown):
        samples = samples.to(device)
        targets = _targets_to(targets, device)
        with autocast_context(amp, device):
            outputs = model(samples)
        outputs = _to_float(outputs)
        loss_dict = criterion(outputs, targets)
        reduced = reduce_dict(loss_dict)
        reduced_scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
        reduced_unscaled = {f"{k}_unscaled": v for k, v in reduced.items()}
        logger.update(loss=sum(float(v) for v in reduced_scaled.values()), **reduced_scaled, **reduced_unscaled)
        if "class_error" in reduced:
            logger.update(class_error=reduced["class_error"])

        orig_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, orig_sizes)
        if "segm" in postprocessors:
            sizes = torch.stack([t["size"] for t in targets], dim=0)
            results = postprocessors["segm"](results, outputs, orig_sizes, sizes)
        if coco_evaluator is not None:
            coco_evaluator.update({int(t["image_id"].reshape(-1)[0]): r for t, r in zip(targets, results)})
        if panoptic_evaluator is not None:
            sizes = torch.stack([t["size"] for t in targets], dim=0)
            panoptic = postprocessors["panoptic"](outputs, sizes, orig_sizes)
            for t, p in zip(targets, panoptic):
                image_id = int(t["image_id"].reshape(-1)[0])
                p["image_id"] = image_id
                p["file_name"] = f"{image_id:012d}.png"
            panoptic_evaluator.update(panoptic)

    logger.synchronize_between_processes()
    print("Averaged stats:", logger.format(shown))
    stats: dict[str, Any] = {name: meter.global_avg for name, meter in logger.meters.items()}
    if coco_evaluator is not None:
        coco_evaluator.synchronize_between_processes()
        coco_evaluator.accumulate()
        coco_evaluator.summarize()
        if "bbox" in iou_types:
            stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
        if "segm" in iou_types:
            stats["coco_eval_masks"] = coco_evaluator.coco_eval["segm"].stats.tolist()
    if panoptic_evaluator is not None:
        panoptic_evaluator.synchronize_between_processes()
        pq = panoptic_evaluator.summarize()
        if pq is not None:
            stats["PQ_all"], stats["PQ_th"], stats["PQ_st"] = pq["All"], pq["Things"], pq["Stuff"]
    return stats, coco_evaluator
