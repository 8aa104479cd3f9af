"""COCO panoptic: images + PNGs of segment ids + a JSON of segments_info -> (image, target).

Layout (as the original): --coco_path holds train2017/ and val2017/ (images); --coco_panoptic_path
holds annotations/panoptic_{train,val}2017.json and panoptic_{train,val}2017/ (PNGs; the folder
unzipped inside annotations/ is accepted too). A PNG pixel's segment id is R + 256 G + 256^2 B;
0 is VOID (unlabelled). Target per image: one entry per segment of segments_info: `masks [N,H,W]`
uint8, `labels [N]` int64 (category ids), `boxes [N,4]` absolute xyxy of the mask (inclusive
max pixel index, as the original), `iscrowd [N]`, `area [N]` (from the JSON), `image_id`,
`orig_size`/`size` (h, w).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import torch
from pycocotools.coco import COCO

from datasets.annotation_checks import describe_missing, load_json, missing_files, number
from datasets.coco import decode_image
from datasets.transforms import transforms_from_args

COCO_PANOPTIC_NUM_CLASSES = 250


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """[H,W,3] uint8 colours -> [H,W] int64 segment ids (id = R + 256 G + 256^2 B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """[H,W] segment ids -> [H,W,3] uint8 colours (inverse of rgb_to_id)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[N,H,W] masks -> [N,4] xyxy float32 (max = last pixel index); empty masks give zeros."""
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            boxes[i] = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
    return boxes


def load_panoptic_json(ann_file: str | Path) -> dict:
    """The panoptic JSON; clear errors for missing/empty/bad files and entries (check_panoptic)."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"panoptic annotation file not found: {ann_file}")
    if ann_file.stat().st_size == 0:
        raise ValueError(f"panoptic annotation file {ann_file} is empty (0 bytes); re-export it")
    try:
        data = load_json(ann_file)
    except json.JSONDecodeError as err:
        raise ValueError(f"panoptic annotation file {ann_file} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "annotations" not in data or "categories" not in data:
        raise ValueError(f"panoptic annotation file {ann_file} is not COCO panoptic format: expected "
                         f"'images', 'annotations' (with segments_info) and 'categories'")
    data.setdefault("images", [])
    check_panoptic(data, ann_file)
    return data


def check_panoptic(data: dict, ann_file: Path) -> None:
    """Refuse entries that would pair a picture with another's segments or break scoring: one entry
    per image_id and per PNG, integer segment ids unique in their PNG, category ids of 'categories'."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list) or not all(isinstance(e, dict) for e in data[key]):
            raise ValueError(f"{ann_file}: '{key}' must be a list of objects")
    listed = [c.get("id") for c in data["categories"]]
    category_ids = {i for i in listed if type(i) is int}
    if len(category_ids) != len(listed):
        twice = next(i for k, i in enumerate(listed) if type(i) is not int or i in listed[:k])
        raise ValueError(f"{ann_file}: category id {twice!r} in 'categories' is not an integer listed once; give "
                         "each category its own integer id")
    image_ids, pngs = set(), set()
    for index, ann in enumerate(data["annotations"]):
        image_id, png, segments = ann.get("image_id"), ann.get("file_name"), ann.get("segments_info")
        where = f"{ann_file}: annotation {index} (image_id {image_id!r}, {png})"
        if type(image_id) is not int or not isinstance(png, str) or not isinstance(segments, list):
            raise ValueError(f"{where} needs an integer 'image_id', the PNG's 'file_name' and a "
                             "'segments_info' list")
        if image_id in image_ids or png in pngs:
            raise ValueError(f"{where}: another annotation has the same image_id or PNG, so one picture "
                             "would get two sets of segments; keep one entry per image")
        image_ids.add(image_id)
        pngs.add(png)
        seen = set()
        for seg in segments:
            seg_id = seg.get("id") if isinstance(seg, dict) else None
            if type(seg_id) is not int or seg_id in seen:
                raise ValueError(f"{where}: segment id {seg_id!r} is not an integer used once in the PNG; "
                                 "each segment needs the id its pixels hold (R + 256 G + 256^2 B)")
            seen.add(seg_id)
            if type(seg.get("category_id")) is not int or seg["category_id"] not in category_ids:
                raise ValueError(f"{where}: segment id {seg_id} has category_id {seg.get('category_id')!r}, "
                                 "which is not an id of 'categories'; add the category or fix the segment")
            if not number(seg.get("area")):
                raise ValueError(f"{where}: segment id {seg_id} has area {seg.get('area')!r}, expected a "
                                 "number of pixels")


class CocoPanoptic(torch.utils.data.Dataset):
    """One item per entry of the JSON's 'annotations' (sorted by image id).

    Attributes: `ann_file`, `ann_folder` (for PanopticEvaluator), `panoptic` (the JSON),
    `category_names`, `thing_ids`, `coco` (a pycocotools index of the segments as boxes, for
    CocoEvaluator's bbox evaluation; built on first use).
    """

    def __init__(self, img_folder: str | Path, ann_folder: str | Path, ann_file: str | Path,
                 transforms: Callable | None = None, return_masks: bool = True,
                 num_classes: int | None = None):
        self.img_folder, self.ann_folder, self.ann_file = Path(img_folder), Path(ann_folder), Path(ann_file)
        for folder in (self.img_folder, self.ann_folder):
            if not folder.is_dir():
                raise FileNotFoundError(f"folder not found: {folder} (needed by {self.ann_file})")
        self.panoptic = load_panoptic_json(self.ann_file)
        self.annotations = sorted(self.panoptic["annotations"], key=lambda a: a["image_id"])
        self.images = {img["id"]: img for img in self.panoptic["images"]}
        self.category_names = {c["id"]: c.get("name", str(c["id"])) for c in self.panoptic["categories"]}
        self.thing_ids = sorted(c["id"] for c in self.panoptic["categories"] if c.get("isthing", 1))
        if num_classes is not None:
            self._check_categories(num_classes)
        self._transforms = transforms
        self.return_masks = return_masks
        self._coco: COCO | None = None

    def check_ready(self, image_set: str) -> None:
        """Before training: every picture and PNG is in its folder, and the split has segments."""
        if not self.annotations:
            raise ValueError(f"{self.ann_file}: the {image_set} split has no annotations (no image with "
                             "segments); give the right panoptic annotation file")
        pictures = [self._image_name(ann) for ann in self.annotations]
        for folder, names, what in ((self.img_folder, pictures, "image"),
                                    (self.ann_folder, [a["file_name"] for a in self.annotations], "PNG")):
            missing = missing_files(folder, names)
            if missing:
                raise ValueError(describe_missing(missing, len(names), folder, self.ann_file, what))
        if not any(ann["segments_info"] for ann in self.annotations):
            raise ValueError(f"{self.ann_file}: the {image_set} split has {len(self.annotations)} image(s) but "
                             "no segments: nothing to learn or score (PQ and AP are undefined); give the right file")

    def _check_categories(self, num_classes: int) -> None:
        for ann in self.annotations:
            for seg in ann["segments_info"]:
                if not 0 <= seg["category_id"] < num_classes:
                    raise ValueError(
                        f"{self.ann_file}: segment id {seg['id']} of {ann['file_name']} has category id "
                        f"{seg['category_id']}, but num_classes={num_classes}; pass --num_classes "
                        f"{max(self.category_names, default=0) + 1} (max category id + 1)")

    @property
    def coco(self) -> COCO:
        if self._coco is None:
            self._coco = segments_as_coco(self.panoptic)
        return self._coco

    def __len__(self) -> int:
        return len(self.annotations)

    def _image_name(self, ann: dict) -> str:
        """The picture's file_name from 'images', else the PNG's name with .jpg (COCO's naming)."""
        info = self.images.get(ann["image_id"])
        return info["file_name"] if info else ann["file_name"].rsplit(".", 1)[0] + ".jpg"

    def _image_path(self, ann: dict) -> Path:
        return self.img_folder / self._image_name(ann)

    def __getitem__(self, index: int):
        ann = self.annotations[index]
        image = decode_image(self._image_path(ann), self.ann_file)
        h, w = int(image.shape[-2]), int(image.shape[-1])
        png = self.ann_folder / ann["file_name"]
        if not png.is_file():
            raise FileNotFoundError(f"panoptic PNG not found: {png} (listed in {self.ann_file})")
        ids = rgb_to_id(np.asarray(PIL.Image.open(png).convert("RGB")))
        if ids.shape != (h, w):
            raise ValueError(f"panoptic PNG {png} is {ids.shape[1]}x{ids.shape[0]} but its image is {w}x{h}")
        segments = ann["segments_info"]
        segment_ids = np.array([s["id"] for s in segments], dtype=np.int64)
        masks = torch.from_numpy(ids[None] == segment_ids[:, None, None]).to(torch.uint8)
        target = {
            "image_id": torch.tensor([ann["image_id"]]),
            "labels": torch.tensor([s["category_id"] for s in segments], dtype=torch.int64),
            "boxes": masks_to_boxes(masks),
            "iscrowd": torch.tensor([s.get("iscrowd", 0) for s in segments], dtype=torch.int64),
            "area": torch.tensor([float(s["area"]) for s in segments], dtype=torch.float32),
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([h, w]),
        }
        if self.return_masks:
            target["masks"] = masks
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        return image, target


def segments_as_coco(panoptic: dict) -> COCO:
    """Panoptic JSON -> pycocotools COCO with one box annotation per segment (things and stuff)."""
    annotations = []
    for ann in panoptic["annotations"]:
        for seg in ann["segments_info"]:
            annotations.append({"id": len(annotations) + 1, "image_id": ann["image_id"],
                                "category_id": seg["category_id"], "bbox": seg["bbox"],
                                "area": seg["area"], "iscrowd": seg.get("iscrowd", 0)})
    images = panoptic["images"] or [{"id": a["image_id"]} for a in panoptic["annotations"]]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": panoptic["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def panoptic_paths(image_set: str, coco_path: str | Path, panoptic_path: str | Path) -> tuple[Path, Path, Path]:
    """(image folder, PNG folder, JSON file) of the original's layout for 'train' or 'val'."""
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
    panoptic_path = Path(panoptic_path)
    png_folder = panoptic_path / f"panoptic_{image_set}2017"
    if not png_folder.is_dir() and (panoptic_path / "annotations" / png_folder.name).is_dir():
        png_folder = panoptic_path / "annotations" / png_folder.name
    return (Path(coco_path) / f"{image_set}2017", png_folder,
            panoptic_path / "annotations" / f"panoptic_{image_set}2017.json")


def build(image_set: str, args) -> CocoPanoptic:
    """`--dataset_file coco_panoptic` from --coco_path and --coco_panoptic_path."""
    if not getattr(args, "coco_path", None) or not getattr(args, "coco_panoptic_path", None):
        raise ValueError("--dataset_file coco_panoptic needs --coco_path (images) and --coco_panoptic_path "
                         "(annotations/panoptic_{train,val}2017.json and panoptic_{train,val}2017/)")
    img_folder, png_folder, ann_file = panoptic_paths(image_set, args.coco_path, args.coco_panoptic_path)
    return CocoPanoptic(img_folder, png_folder, ann_file,
                        transforms=transforms_from_args(image_set, args),
                        return_masks=bool(getattr(args, "masks", True)),
                        num_classes=getattr(args, "num_classes", None) or COCO_PANOPTIC_NUM_CLASSES)
