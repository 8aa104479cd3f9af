"""The baseline of bench_data.py: DETR's data recipe written plainly on PIL images, as the original did it.

Train: PIL decode -> random flip -> random short side 480..800 (long <= 1333), or resize to 400/500/600,
random crop 384..600, then the same multi-scale resize -> normalised tensor, boxes (absolute xyxy in) to
normalised cxcywh -> padded batch and mask. Val: short side 800.
"""
from __future__ import annotations

import random

import torch
from PIL import Image
from torchvision.transforms import functional as TF

import common  # noqa: F401  (puts the repository root on sys.path)
from datasets.transforms import resized_hw

SCALES = list(range(480, 801, 32))
MAX_SIZE = 1333
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def decode(path: str) -> Image.Image:
    """The JPEG file as an RGB PIL image."""
    with Image.open(path) as img:
        return img.convert("RGB")


def resize(img: Image.Image, boxes: torch.Tensor, size: int, max_size: int | None) -> tuple[Image.Image, torch.Tensor]:
    h, w = resized_hw((img.height, img.width), size, max_size)  # the size arithmetic is not what is timed
    scale = torch.tensor([w / img.width, h / img.height, w / img.width, h / img.height])
    return img.resize((w, h), Image.BILINEAR), boxes * scale


def hflip(img: Image.Image, boxes: torch.Tensor) -> tuple[Image.Image, torch.Tensor]:
    w = img.width
    flipped = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([w, 0.0, w, 0.0])
    return img.transpose(Image.FLIP_LEFT_RIGHT), flipped


def random_size_crop(img: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, min_size: int,
                     max_size: int) -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
    w = random.randint(min_size, min(img.width, max_size))
    h = random.randint(min_size, min(img.height, max_size))
    top = random.randint(0, img.height - h)
    left = random.randint(0, img.width - w)
    cropped = img.crop((left, top, left + w, top + h))
    moved = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    moved = torch.min(moved.reshape(-1, 2, 2), torch.tensor([w, h], dtype=boxes.dtype)).clamp(min=0)
    keep = (moved[:, 1, :] > moved[:, 0, :]).all(dim=1)
    return cropped, moved.reshape(-1, 4)[keep], labels[keep]


def to_normalised(img: Image.Image, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float tensor [3,H,W] normalised with ImageNet statistics; boxes to cxcywh / (w, h)."""
    tensor = TF.normalize(TF.to_tensor(img), MEAN, STD)
    h, w = tensor.shape[-2:]
    x0, y0, x1, y1 = boxes.unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    return tensor, cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)


def train_transform(img: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
    boxes, labels = target["boxes"], target["labels"]
    if random.random() < 0.5:
        img, boxes = hflip(img, boxes)
    if random.random() < 0.5:
        img, boxes = resize(img, boxes, random.choice(SCALES), MAX_SIZE)
    else:
        img, boxes = resize(img, boxes, random.choice([400, 500, 600]), None)
        img, boxes, labels = random_size_crop(img, boxes, labels, 384, 600)
        img, boxes = resize(img, boxes, random.choice(SCALES), MAX_SIZE)
    tensor, boxes = to_normalised(img, boxes)
    return tensor, {"boxes": boxes, "labels": labels, "size": torch.tensor(tensor.shape[-2:])}


def val_transform(img: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
    img, boxes = resize(img, target["boxes"], 800, MAX_SIZE)
    tensor, boxes = to_normalised(img, boxes)
    return tensor, {"boxes": boxes, "labels": target["labels"], "size": torch.tensor(tensor.shape[-2:])}


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Pad bottom/right to the largest image: (images [B,3,H,W], mask [B,H,W] True on padding, targets)."""
    images = [img for img, _ in batch]
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    padded = torch.zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, img in enumerate(images):
        padded[i, :, : img.shape[1], : img.shape[2]] = img
        mask[i, : img.shape[1], : img.shape[2]] = False
    return padded, mask, [t for _, t in batch]
