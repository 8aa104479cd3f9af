"""TensorBoard scalars for a run: every train/test stat per epoch, the loss every N iterations.

`TensorboardWriter(log_dir)` wraps torch's SummaryWriter. Without the tensorboard package it
prints one notice and does nothing, so training never depends on it.
Tags: `train_loss` -> `train/loss`; list stats such as `test_coco_eval_bbox` (the 12 COCO
numbers) -> `test/coco_eval_bbox/AP`, `.../AP50`, ...; a `prefix` goes in front (`iter/loss`).
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any

# The order pycocotools' COCOeval.stats uses.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def _tag(key: str, prefix: str) -> str:
    for split in ("train_", "test_"):
        if key.startswith(split):
            key = f"{split[:-1]}/{key[len(split):]}"
            break
    if prefix:
        return f"{prefix.rstrip('/')}/{key}"
    return key


def _as_number(value: Any) -> float | None:
    """A float for scalars (Python numbers, 0-d/1-element tensors and arrays), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Number):
        return float(value)
    if hasattr(value, "numel") and value.numel() == 1:  # torch tensor
        return float(value.item())
    if hasattr(value, "size") and hasattr(value, "item") and value.size == 1:  # numpy
        return float(value.item())
    return None


def scalar_items(stats: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """(tag, value) pairs for every scalar in `stats`; lists of scalars are expanded, the rest skipped."""
    items = []
    for key, value in stats.items():
        number = _as_number(value)
        if number is not None:
            items.append((_tag(key, prefix), number))
            continue
        if isinstance(value, (list, tuple)) and value:
            numbers_ = [_as_number(v) for v in value]
            if any(n is None for n in numbers_):
                continue
            names = COCO_STAT_NAMES if len(numbers_) == len(COCO_STAT_NAMES) and "coco_eval" in key \
                else [str(i) for i in range(len(numbers_))]
            items.extend((f"{_tag(key, prefix)}/{name}", n) for name, n in zip(names, numbers_))
    return [(tag, n) for tag, n in items if not math.isnan(n)]


class TensorboardWriter:
    """Scalars to TensorBoard event files in `log_dir`; a no-op when tensorboard is missing."""

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = str(log_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("TensorBoard logging disabled: the tensorboard package is not installed "
                  "(pip install tensorboard to enable it)")
            self._writer = None
            return
        self._writer = SummaryWriter(log_dir=self.log_dir)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def add_scalars(self, stats: dict[str, Any], step: int, prefix: str = "") -> None:
        """Write every scalar of `stats` at `step` (see the module doc for the tags)."""
        if self._writer is None:
            return
        for tag, value in scalar_items(stats, prefix):
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
