"""Training-set augmentations that add objects per image, and when they run.

--mosaic P (datasets/mosaic.py) and --box_paste N (datasets/box_paste.py) need boxes only;
--copy_paste N (datasets/copy_paste.py) needs polygons. --aug_off_epochs K turns all three off
for the last K epochs, so training ends on images like the validation ones (DEIM's Dense O2O
schedule). They act on the training CocoDetection (COCO, custom, shapes, YOLO) before its
transforms; the validation set is never touched. Random draws come from torch's global
generator, which main.py reseeds every epoch (and DataLoader workers from it), so a seed fixes
them and --resume reproduces them.
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from datasets.box_paste import paste_boxes
from datasets.mosaic import mosaic


class ObjectAugment:
    """Called by CocoDetection on each raw training item: (dataset, image, target) -> (image, target)."""

    def __init__(self, mosaic_probability: float = 0.0, box_paste: int = 0):
        self.mosaic_probability = mosaic_probability
        self.box_paste = box_paste
        self.active = True  # False in the last --aug_off_epochs epochs

    def __call__(self, dataset, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if not self.active:
            return image, target
        if self.mosaic_probability > 0 and float(torch.rand(())) < self.mosaic_probability:
            others = torch.randint(0, len(dataset), (3,)).tolist()
            tiles = [(image, target)] + [dataset.load(i) for i in others]
            height, width = int(image.shape[-2]), int(image.shape[-1])
            # centre in the middle half of the canvas, tiles at 0.5-1x: each shows a good part of its image
            cx = min(width - 1, max(1, round(width * (0.25 + 0.5 * float(torch.rand(()))))))
            cy = min(height - 1, max(1, round(height * (0.25 + 0.5 * float(torch.rand(()))))))
            scale = 0.5 + 0.5 * float(torch.rand(()))
            image, target = mosaic(tiles, (cx, cy), scale)
        if self.box_paste > 0:
            source, source_target = dataset.load(int(torch.randint(0, len(dataset), ())))
            image, target = paste_boxes(image, target, source, source_target, self.box_paste)
        return image, target


def attach(dataset, args: argparse.Namespace) -> None:
    """Check --mosaic, --box_paste, --aug_off_epochs and give the training `dataset` its ObjectAugment
    (nothing when both are off). Raises ValueError naming the flag for bad values or datasets."""
    from datasets.coco import CocoDetection

    probability = float(getattr(args, "mosaic", 0.0) or 0.0)
    count = int(getattr(args, "box_paste", 0) or 0)
    off = int(getattr(args, "aug_off_epochs", 0) or 0)
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"--mosaic {probability}: the probability of a mosaic per training image must be in [0, 1] "
                         "(0 = off)")
    if count < 0:
        raise ValueError(f"--box_paste {count}: must be 0 (off) or a number of boxes to paste per image")
    if off < 0:
        raise ValueError(f"--aug_off_epochs {off}: must be 0 (augment every epoch) or a number of final epochs")
    if probability == 0 and count == 0:
        return
    flag = "--mosaic" if probability else "--box_paste"
    if not isinstance(dataset, CocoDetection):
        raise ValueError(f"{flag}: --dataset_file {getattr(args, 'dataset_file', '?')} is not a detection set; "
                         "use coco, custom, shapes or yolo, or turn it off")
    if count and getattr(args, "masks", False):
        raise ValueError(f"--box_paste {count}: pastes box rectangles, not instance masks; with --masks use "
                         "--copy_paste (and/or --mosaic), or pass --box_paste 0")
    dataset.object_augment = ObjectAugment(probability, count)


def set_epoch(dataset, epoch: int, args: argparse.Namespace) -> None:
    """Turn the object augmentations (--mosaic, --box_paste, --copy_paste) of the training `dataset` on,
    or off for the last --aug_off_epochs epochs. A function of the epoch alone, so --resume agrees."""
    off = int(getattr(args, "aug_off_epochs", 0) or 0)
    active = epoch < args.epochs - off
    augment = getattr(dataset, "object_augment", None)
    if augment is not None:
        augment.active = active
    if getattr(args, "copy_paste", 0) and hasattr(dataset, "copy_paste"):
        dataset.copy_paste = args.copy_paste if active else 0
