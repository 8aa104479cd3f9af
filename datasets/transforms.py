"""DETR's augmentation recipe on (image, target) pairs.

An image is a PIL image or a uint8 tensor [3,H,W] (torchvision.io's decode output). A target is
the dataset's dict (docs/internals.md): `boxes [N,4]` absolute xyxy float32, `labels [N]`,
optional `masks [N,H,W]`, `area [N]`, `iscrowd [N]`, `size`/`orig_size` as (h, w).
The geometry goes through torchvision.transforms.v2 on tv_tensors (BoundingBoxes, Mask); the
random draws use Python's `random` module in the original's order, so a seeded run draws the
same sizes, crops and flips as the original. `Normalize` ends the recipe: float image
normalised with ImageNet statistics, boxes as cxcywh divided by the processed (w, h).
"""
from __future__ import annotations

import random
from typing import Callable

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

ImageLike = PIL.Image.Image | torch.Tensor
Target = dict
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fields that hold one entry per object and must follow a crop's filtering.
PER_OBJECT_FIELDS = ("boxes", "labels", "area", "iscrowd", "masks")


def image_hw(image: ImageLike) -> tuple[int, int]:
    """(height, width) of a PIL image or a [..., H, W] tensor."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def resized_hw(hw: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) for a short side of `size`, shrunk so the long side stays <= `max_size`.

    Integer arithmetic as the original's get_size_with_aspect_ratio (truncation, not rounding,
    for the long side), so processed sizes match the original's pixel for pixel.
    """
    h, w = hw
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _boxes(target: Target, hw: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=hw)


def resize(image: ImageLike, target: Target | None, size: int, max_size: int | None = None):
    """Short side to `size` (long side <= max_size), bilinear with antialias (= PIL's bilinear).

    Boxes scale by the exact ratios new/old per axis, `area` by their product, masks go nearest.
    """
    old_hw = image_hw(image)
    new_hw = resized_hw(old_hw, size, max_size)
    image = F.resize(image, list(new_hw), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    if target is None:
        return image, None
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = F.resize(_boxes(target, old_hw), list(new_hw)).as_subclass(torch.Tensor)
    if "area" in target:
        target["area"] = target["area"] * (new_hw[0] / old_hw[0]) * (new_hw[1] / old_hw[1])
    if "masks" in target:
        target["masks"] = _resize_masks(target["masks"], new_hw)
    target["size"] = torch.tensor(new_hw)
    return image, target


def _resize_masks(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *hw))
    resized = F.resize(tv_tensors.Mask(masks.to(torch.uint8)), list(hw),
                       interpolation=v2.InterpolationMode.NEAREST)
    return resized.as_subclass(torch.Tensor).to(masks.dtype)


def crop(image: ImageLike, target: Target, top: int, left: int, height: int, width: int):
    """Crop to the window; boxes shift and clamp to it, objects left with no area are dropped.

    As the original: `area` becomes the clamped box area; an object is kept when its clamped box
    has positive width and height (or, for targets without boxes, when its mask is non-empty).
    """
    old_hw = image_hw(image)
    image = F.crop(image, top, left, height, width)
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    keep = None
    if "boxes" in target:
        boxes = F.crop(_boxes(target, old_hw), top, left, height, width).as_subclass(torch.Tensor)
        target["boxes"] = boxes
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if "masks" in target:
        target["masks"] = target["masks"][:, top:top + height, left:left + width]
        if keep is None:
            keep = target["masks"].flatten(1).any(1)
    if keep is not None:
        for field in PER_OBJECT_FIELDS:
            if field in target:
                target[field] = target[field][keep]
    return image, target


def hflip(image: ImageLike, target: Target | None):
    """Mirror left-right: x -> w - x for boxes, masks flipped along their width."""
    hw = image_hw(image)
    image = F.horizontal_flip(image)
    if target is None:
        return image, None
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = F.horizontal_flip(_boxes(target, hw)).as_subclass(torch.Tensor)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image, target


class RandomHorizontalFlip:
    """Flip with probability p (one `random.random()` draw, as the original)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: ImageLike, target: Target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize the short side to `random.choice(sizes)`, long side capped at max_size."""

    def __init__(self, sizes: list[int], max_size: int | None = None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target | None = None):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random window, width in [min_size, min(W, max_size)], same for the height.

    Sizes are drawn with `random.randint`, the corner with `torch.randint` (the original's draws).

    The original required W, H >= min_size and crashed on smaller images; here the lower bound
    is clamped to the image, so a small image gets a crop no larger than itself.
    """

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target):
        img_h, img_w = image_hw(image)
        width = random.randint(min(self.min_size, img_w), min(img_w, self.max_size))
        height = random.randint(min(self.min_size, img_h), min(img_h, self.max_size))
        # The window's corner comes from torch's generator, as in the original (RandomCrop.get_params),
        # which draws nothing when the window is the whole image.
        if (height, width) == (img_h, img_w):
            return crop(image, target, 0, 0, height, width)
        top = int(torch.randint(0, img_h - height + 1, (1,)))
        left = int(torch.randint(0, img_w - width + 1, (1,)))
        return crop(image, target, top, left, height, width)


class RandomSelect:
    """Apply `first` with probability p, else `second`."""

    def __init__(self, first: Callable, second: Callable, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: ImageLike, target: Target):
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)


class Normalize:
    """Image -> float32 [3,H,W] normalised with mean/std; boxes -> cxcywh / (w, h) of this image."""

    def __init__(self, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: ImageLike, target: Target | None = None):
        # Decoded and resized images are HWC in memory; one uint8 copy to CHW makes the float
        # conversion, the in-place normalisation and the batch padding copy run on contiguous memory.
        # In place only on the fresh float copy: a float32 input would otherwise be overwritten.
        chw = F.to_image(image).contiguous()
        tensor = F.to_dtype(chw, torch.float32, scale=True).as_subclass(torch.Tensor)
        tensor = F.normalize(tensor, self.mean, self.std, inplace=chw.dtype != torch.float32)
        if target is None:
            return tensor, None
        target = dict(target)
        if "boxes" in target:
            h, w = tensor.shape[-2:]
            x0, y0, x1, y1 = target["boxes"].unbind(-1)
            cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
            target["boxes"] = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
        return tensor, target


class Compose:
    """Run (image, target) through each transform in turn."""

    def __init__(self, transforms: list[Callable]):
        self.transforms = transforms

    def __call__(self, image: ImageLike, target: Target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def scaled(sizes: list[int], image_scale: float) -> list[int]:
    """Each size times image_scale, rounded to an int (>= 1)."""
    return [max(1, int(round(s * image_scale))) for s in sizes]


AUGMENTATIONS = ("detr", "flip", "none")


def make_detr_transforms(image_set: str, image_scale: float = 1.0, augment: str = "detr") -> Compose:
    """The original recipe ('train' or 'val'); image_scale multiplies every size in it.

    train: flip 0.5, then 50/50 a resize to one of 480..800 step 32 (long side <= 1333), or
    a resize to 400/500/600 + random crop 384..600 + the same multi-scale resize.
    val: short side 800, long side <= 1333. Both end with `Normalize`.
    augment (train only): 'detr' is the recipe above; 'flip' keeps only the flip and resizes as
    val does; 'none' is the val transform. The lighter ones exist for tiny datasets and short
    schedules (the shapes demo, memorisation checks), where crops and multi-scale slow learning.
    """
    if image_scale <= 0:
        raise ValueError(f"image_scale must be > 0, got {image_scale}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    scales = scaled(list(range(480, 801, 32)), image_scale)
    max_size = scaled([1333], image_scale)[0]
    val_resize = RandomResize(scaled([800], image_scale), max_size=max_size)
    if image_set == "train" and augment == "detr":
        crop_min, crop_max = scaled([384, 600], image_scale)
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=max_size),
                Compose([
                    RandomResize(scaled([400, 500, 600], image_scale)),
                    RandomSizeCrop(crop_min, crop_max),
                    RandomResize(scales, max_size=max_size),
                ]),
            ),
            Normalize(),
        ])
    if image_set == "train" and augment == "flip":
        return Compose([RandomHorizontalFlip(), val_resize, Normalize()])
    if image_set in ("train", "val"):
        return Compose([val_resize, Normalize()])
    raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")


def transforms_from_args(image_set: str, args) -> Compose:
    """make_detr_transforms with --image_scale and --augment (defaults: the original's recipe)."""
    return make_detr_transforms(image_set, getattr(args, "image_scale", 1.0), getattr(args, "augment", "detr"))
