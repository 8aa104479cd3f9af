"""Pictures out: detections drawn on a picture (masks tinted, boxes outlined, labels with scores),
small pictures enlarged first so labels stay legible."""
from __future__ import annotations

import colorsys
import math

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch


def colour_for(category_id: int) -> tuple[int, int, int]:
    """A stable, saturated colour per category (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((category_id * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


# Pictures whose longer side is below this are drawn enlarged (by a whole factor), so that boxes
# and labels stay legible on small inputs (the shapes data is 128 px).
DRAW_MIN_LONG_SIDE = 512


def drawing_scale(size_wh: tuple[int, int]) -> int:
    """The whole factor by which a picture of `size_wh` is enlarged for drawing (1 when large enough)."""
    return max(1, math.ceil(DRAW_MIN_LONG_SIDE / max(size_wh)))


def place_label(box_xyxy: list[float], label_wh: tuple[int, int], canvas_wh: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a `label_wh` label for a box: on top of the box's top-left corner, inside
    the box when there is no room above, and moved left/up as needed to lie inside the picture."""
    (width, height), (canvas_w, canvas_h) = label_wh, canvas_wh
    x = min(max(0.0, box_xyxy[0]), max(0, canvas_w - width))
    y = box_xyxy[1] - height if box_xyxy[1] - height >= 0 else box_xyxy[1]
    y = min(max(0.0, y), max(0, canvas_h - height))
    return round(x), round(y)


def draw_detections(image: PIL.Image.Image, boxes_xyxy: torch.Tensor, labels: list[str], category_ids: list[int],
                    masks: torch.Tensor | None = None, scores: list[float] | None = None) -> PIL.Image.Image:
    """A copy of `image` with each mask tinted, each box outlined and its label written at it.

    boxes_xyxy [N, 4] in `image`'s pixels; masks [N, h, w] bool, resized to the image if needed.
    Boxes then labels are drawn in increasing `scores` order, so the highest-scoring box and label
    are on top; labels stay inside the picture (`place_label`).
    """
    canvas = image.convert("RGB")
    if masks is not None and len(masks):
        overlay = canvas.copy()
        for mask, category_id in zip(masks, category_ids):
            solid = PIL.Image.new("RGB", canvas.size, colour_for(category_id))
            stencil = PIL.Image.fromarray(mask.to(torch.uint8).mul(255).numpy(), mode="L")
            overlay.paste(solid, mask=stencil.resize(canvas.size, PIL.Image.NEAREST))
        canvas = PIL.Image.blend(canvas, overlay, 0.45)
    draw = PIL.ImageDraw.Draw(canvas)
    line = max(1, round(min(canvas.size) / 250))
    font = PIL.ImageFont.load_default(size=max(11, round(max(canvas.size) / 50)))
    order = sorted(range(len(labels)), key=lambda i: scores[i]) if scores is not None else range(len(labels))
    boxes = boxes_xyxy.tolist()
    for i in order:
        draw.rectangle(boxes[i], outline=colour_for(category_ids[i]), width=line)
    for i in order:
        left, top, right, bottom = draw.textbbox((0, 0), labels[i], font=font)
        size = (right - left + 4, bottom - top + 4)  # 2 px padding on each side
        x, y = place_label(boxes[i], size, canvas.size)
        draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), fill=colour_for(category_ids[i]))
        draw.text((x + 2 - left, y + 2 - top), labels[i], fill=(0, 0, 0), font=font)
    return canvas


def draw_enlarged(picture: PIL.Image.Image, boxes_xyxy: torch.Tensor, labels: list[str], category_ids: list[int],
                  masks: torch.Tensor | None = None, scores: list[float] | None = None) -> PIL.Image.Image:
    """`draw_detections` on `picture` enlarged by `drawing_scale` (boxes and masks given at its own size)."""
    factor = drawing_scale(picture.size)
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), PIL.Image.BICUBIC)
    return draw_detections(picture, boxes_xyxy * factor, labels, category_ids, masks, scores)
