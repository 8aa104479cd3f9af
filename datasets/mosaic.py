"""Mosaic (YOLOv4; the dense one-to-one matching of DEIM, CVPR 2025): four training images in one.

The four images are scaled by one factor and laid out 2x2 around a centre point of the canvas,
each with its corner at the centre, so the canvas holds parts of all four and about four times
the objects of one image: more queries are matched per step. It needs boxes only (masks are
carried when present), so it serves YOLO exports and boxes-only COCO files alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BACKGROUND = 114  # grey of canvas parts no tile covers (YOLO's)


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    """uint8 [3,h,w] -> uint8 [3,height,width], bilinear with antialiasing."""
    out = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def mosaic(tiles: list[tuple[Tensor, dict]], centre: tuple[int, int], scale: float,
           min_size: float = 1.0) -> tuple[Tensor, dict]:
    """Four (image uint8 [3,h,w], target with absolute xyxy boxes) -> one (image, target).

    The canvas has the size of tiles[0]'s image; `centre` (x, y) is a pixel of it. Every tile is
    resized by `scale` and placed with a corner at the centre: tile 0 above-left of it, 1
    above-right, 2 below-left, 3 below-right; what falls outside its quadrant is cut off. Boxes
    are scaled, shifted and clipped to the visible part of their tile; a box left narrower or
    lower than `min_size` pixels is dropped (its object is cut away). Labels, iscrowd and masks
    (when the targets have them) follow their boxes; area scales with the visible box area.
    The other keys (image_id, orig_size, size) are tiles[0]'s.
    """
    if len(tiles) != 4:
        raise ValueError(f"mosaic needs 4 tiles, got {len(tiles)}")
    image0, target0 = tiles[0]
    height, width = int(image0.shape[-2]), int(image0.shape[-1])
    cx, cy = centre
    if not (0 < cx < width and 0 < cy < height):
        raise ValueError(f"mosaic centre {centre} must lie inside the {width}x{height} canvas")
    canvas = torch.full((3, height, width), BACKGROUND, dtype=torch.uint8)
    with_masks = "masks" in target0
    quadrants = [(0, 0, cx, cy), (cx, 0, width, cy), (0, cy, cx, height), (cx, cy, width, height)]
    boxes, labels, areas, iscrowd, masks = [], [], [], [], []
    for k, ((image, target), (qx0, qy0, qx1, qy1)) in enumerate(zip(tiles, quadrants)):
        h, w = int(image.shape[-2]), int(image.shape[-1])
        hs, ws = max(1, round(h * scale)), max(1, round(w * scale))
        ox = cx - ws if k in (0, 2) else cx  # canvas position of the resized tile's top-left pixel
        oy = cy - hs if k in (0, 1) else cy
        x0, y0, x1, y1 = max(qx0, ox), max(qy0, oy), min(qx1, ox + ws), min(qy1, oy + hs)
        if x1 <= x0 or y1 <= y0:
            continue
        canvas[:, y0:y1, x0:x1] = _resize(image, hs, ws)[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        tile_boxes = target["boxes"].float() * torch.tensor([ws / w, hs / h, ws / w, hs / h])
        tile_boxes += torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
        full_area = (tile_boxes[:, 2] - tile_boxes[:, 0]) * (tile_boxes[:, 3] - tile_boxes[:, 1])
        clipped = torch.stack([tile_boxes[:, 0].clamp(x0, x1), tile_boxes[:, 1].clamp(y0, y1),
                               tile_boxes[:, 2].clamp(x0, x1), tile_boxes[:, 3].clamp(y0, y1)], dim=1)
        keep = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
        visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        fraction = torch.where(full_area > 0, visible / full_area.clamp(min=1e-6), torch.zeros_like(visible))
        boxes.append(clipped[keep])
        labels.append(target["labels"][keep])
        areas.append((target["area"].float() * (ws * hs) / (w * h) * fraction)[keep])
        iscrowd.append(target["iscrowd"][keep])
        if with_masks and keep.any():
            resized = F.interpolate(target["masks"][keep][:, None].float(), size=(hs, ws), mode="nearest")[:, 0]
            placed = torch.zeros((int(keep.sum()), height, width), dtype=target["masks"].dtype)
            placed[:, y0:y1, x0:x1] = resized[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox].to(placed.dtype)
            masks.append(placed)
    out = dict(target0)
    out["boxes"] = torch.cat(boxes).to(target0["boxes"].dtype) if boxes else target0["boxes"][:0]
    out["labels"] = torch.cat(labels) if labels else target0["labels"][:0]
    out["area"] = torch.cat(areas).to(target0["area"].dtype) if areas else target0["area"][:0]
    out["iscrowd"] = torch.cat(iscrowd) if iscrowd else target0["iscrowd"][:0]
    if with_masks:
        out["masks"] = torch.cat(masks) if masks else torch.zeros((0, height, width), dtype=target0["masks"].dtype)
    return canvas, out
