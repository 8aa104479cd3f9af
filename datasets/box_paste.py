"""Box-level copy-paste: the rectangle of an object's box, taken from another training image, pasted
where it overlaps no box already there. Copy-paste for data without polygons (YOLO exports,
boxes-only COCO files): more objects per image for the one-to-one matching, boxes only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from datasets.copy_paste import paste_objects

# paste_objects accepts a place when its IoU with every box there is below this: no overlap at all.
NO_OVERLAP = 1e-12


def paste_boxes(image: Tensor, target: dict, source: Tensor, source_target: dict, count: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
    """Paste the box rectangles of up to `count` random objects of `source` into `image`.

    image, source: uint8 [3,H,W]; target, source_target: absolute xyxy boxes (before the
    transforms). A rectangle is its box rounded outwards to whole pixels; it keeps its size and
    goes to a random place that overlaps no box of `target` nor an earlier pasted one (10 tries,
    else it is skipped). Its new box is that rectangle, its label the source object's. Returns
    new tensors; the inputs are not modified. Targets with masks are refused (a rectangle is no
    instance mask: use --copy_paste for mask training).
    """
    if "masks" in target:
        raise ValueError("--box_paste pastes box rectangles, not instance masks: with --masks use --copy_paste")
    height, width = int(source.shape[-2]), int(source.shape[-1])
    order = torch.randperm(len(source_target["boxes"]), generator=generator)[:count].tolist()
    objects = []
    for i in order:  # crowd regions never get here: CocoDetection drops them when it builds the target
        x0, y0, x1, y1 = source_target["boxes"][i].tolist()
        left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
        right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
        if right <= left or bottom <= top:
            continue
        rectangle = torch.zeros((height, width), dtype=torch.bool)
        rectangle[top:bottom, left:right] = True
        objects.append((rectangle, int(source_target["labels"][i])))
    return paste_objects(image, target, source, objects, max_iou=NO_OVERLAP, generator=generator)
