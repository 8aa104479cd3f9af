"""COCO detection: image files + an instances JSON -> (image, target) pairs for DETR.

Layout of --coco_path (as the original): train2017/, val2017/,
annotations/instances_{train,val}2017.json. Each item is `transforms(image, target)` with the
target of docs/internals.md: `boxes [N,4]` absolute xyxy float32 (clamped to the image),
`labels [N]` int64 (COCO category ids), `masks [N,H,W]` uint8 (with return_masks), `image_id [1]`,
`area [N]`, `iscrowd [N]`, `orig_size`/`size` (h, w). Crowd annotations are dropped, as are boxes
with no width or height after clamping (counted once per annotation file, logged as a warning).
Entries that would train on the wrong thing are refused when the file is read
(datasets/annotation_checks.py); `CocoDetection.check_ready` finds missing pictures, sizes that
disagree with the JSON and splits without images or boxes before a run starts.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torchvision.io
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from datasets.annotation_checks import (box_array, check_instances, describe_missing, load_json, missing_files,
                                        orphan_annotations)
from datasets.copy_paste import paste_objects
from datasets.transforms import transforms_from_args

logger = logging.getLogger(__name__)
# torchvision 0.29 announces the move of its decoders to TorchCodec on every call; the decoders
# still work and are the fast path here, so the notice would only flood the training log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

COCO_NUM_CLASSES = 91
# Formats torchvision.io decodes natively; anything else PIL can open goes through PIL.
TORCHVISION_FORMATS = {"JPEG", "PNG", "WEBP", "GIF"}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
# Splits up to this many images have every picture's size checked against the JSON before training
# (a header read each); larger ones (COCO) are checked as each picture is decoded.
SIZE_CHECK_LIMIT = 2000


def _where(path: Path, ann_file: str | Path | None) -> str:
    return f"{path}" + (f" (listed in {ann_file})" if ann_file else "")


def _open_header(path: Path, ann_file: str | Path | None) -> PIL.Image.Image:
    """Open the file lazily with PIL (header only): existence, format and the pixel-count limit."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {_where(path, ann_file)}; check the image "
                                f"folder and the file_name entries of the annotation file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            header = PIL.Image.open(path)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as err:
        raise ValueError(f"image refused: {_where(path, ann_file)} has more pixels than PIL's "
                         f"decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS = "
                         f"{PIL.Image.MAX_IMAGE_PIXELS}): {err}. If the image is genuine, raise "
                         f"PIL.Image.MAX_IMAGE_PIXELS or downscale the file") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"unreadable image {_where(path, ann_file)}: {err}; the file is damaged, "
                         f"truncated or not an image (re-export or remove it)") from None
    return header


def decode_image(path: str | Path, ann_file: str | Path | None = None) -> torch.Tensor:
    """The image file as a uint8 RGB tensor [3,H,W], upright by its EXIF orientation.

    Grayscale, RGBA (alpha dropped), palette and CMYK become RGB; 16-bit PNGs keep their top 8 bits.
    Missing files, files that are not images, truncated files and images above
    PIL.Image.MAX_IMAGE_PIXELS raise with the file (and the annotation file listing it) in the message.
    """
    path = Path(path)
    header = _open_header(path, ann_file)
    image_format = header.format
    header.close()
    if image_format not in TORCHVISION_FORMATS:
        return _pil_to_tensor(decode_image_pil(path, ann_file))
    try:
        data = torchvision.io.read_file(str(path))
        image = torchvision.io.decode_image(data, mode=torchvision.io.ImageReadMode.RGB,
                                            apply_exif_orientation=True)
    except RuntimeError as err:
        raise ValueError(f"unreadable image {_where(path, ann_file)}: {err}; the file is damaged, "
                         f"truncated or not an image (re-export or remove it)") from None
    if image.dtype == torch.uint16:  # 16-bit PNG: keep the top 8 bits, as every 8-bit viewer shows it
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def decode_image_pil(path: str | Path, ann_file: str | Path | None = None) -> PIL.Image.Image:
    """Reference path on plain PIL: the file as an RGB PIL image, EXIF orientation applied."""
    path = Path(path)
    header = _open_header(path, ann_file)
    try:
        with header:
            image = PIL.ImageOps.exif_transpose(header)
            if image.mode.startswith("I;16"):  # PIL would clip 16-bit values at 255; keep the top 8 bits
                image = PIL.Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
            return image.convert("RGB")
    except OSError as err:
        raise ValueError(f"unreadable image {_where(path, ann_file)}: {err}; the file is damaged, "
                         f"truncated or not an image (re-export or remove it)") from None


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the picture as decode_image returns it (EXIF orientation applied), header only."""
    path = Path(path)
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"unreadable image {path}: {err}; the file is damaged or not an image") from None
    return (height, width) if orientation in _ROTATED else (width, height)


def _pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_coco_api(ann_file: str | Path) -> COCO:
    """A pycocotools COCO index of the JSON file; clear errors for missing, empty, bad JSON or bad entries
    (datasets.annotation_checks.check_instances)."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    if ann_file.stat().st_size == 0:
        raise ValueError(f"annotation file {ann_file} is empty (0 bytes); re-export it as "
                         f"COCO-format JSON")
    try:
        dataset = load_json(ann_file)
    except json.JSONDecodeError as err:
        raise ValueError(f"annotation file {ann_file} is not valid JSON: {err}; re-export it as "
                         f"COCO-format JSON") from None
    if not isinstance(dataset, dict) or "images" not in dataset:
        raise ValueError(f"annotation file {ann_file} is not COCO format: expected a JSON object "
                         f"with 'images', 'annotations' and 'categories'")
    if dataset.get("annotations") and "categories" not in dataset:
        raise ValueError(f"annotation file {ann_file} has annotations but no 'categories' list; add "
                         '"categories": [{"id": 1, "name": "..."}, ...] with every category_id used')
    for key in ("annotations", "categories"):
        dataset.setdefault(key, [])
    check_instances(dataset, ann_file)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def xywh_to_clamped_xyxy(bbox: list | np.ndarray, height: int, width: int) -> np.ndarray:
    """COCO [x, y, w, h] boxes [N,4] -> xyxy [N,4] clamped to the image (float32)."""
    boxes = np.asarray(bbox, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def segmentation_to_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygon list, uncompressed or compressed RLE) -> uint8 mask [H,W].

    An RLE whose size is not the image's, or uncompressed counts that do not cover exactly H*W
    pixels, is a ValueError: pycocotools would leave the rest of the mask uninitialised (or write
    past it) instead of failing.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=np.uint8)
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    else:
        size = list(segmentation.get("size", []))
        if size != [height, width]:
            raise ValueError(f"RLE segmentation has size {size}, but the image is [{height}, {width}] "
                             "(height, width); re-encode the mask at the image's size")
        rle = segmentation
        if isinstance(segmentation.get("counts"), list):
            covered = sum(segmentation["counts"])
            if covered != height * width:
                raise ValueError(f"uncompressed RLE counts cover {covered} pixels, but its size "
                                 f"{height}x{width} has {height * width}; the run lengths must add up "
                                 "to height*width (column-major)")
            rle = coco_mask.frPyObjects(segmentation, height, width)
    return coco_mask.decode([rle])[:, :, 0].astype(np.uint8)


class ConvertCocoPolysToMask:
    """(image size, image id, COCO annotations) -> the target dict (docs/internals.md)."""

    def __init__(self, return_masks: bool = False):
        self.return_masks = return_masks

    def __call__(self, hw: tuple[int, int], image_id: int, annotations: list[dict]) -> dict:
        h, w = hw
        anns = [a for a in annotations if a.get("iscrowd", 0) == 0]
        boxes = xywh_to_clamped_xyxy([a["bbox"] for a in anns], h, w)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        anns = [a for a, k in zip(anns, keep) if k]
        target = {
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor([image_id]),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64),
            "orig_size": torch.tensor([h, w]),
            "size": torch.tensor([h, w]),
        }
        if self.return_masks:
            masks = []
            for a in anns:
                try:
                    masks.append(segmentation_to_mask(a.get("segmentation", []), h, w))
                except ValueError as error:
                    raise ValueError(f"annotation id {a.get('id')}: {error}") from None
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, h, w), dtype=torch.uint8))
        return target


def count_boxes(coco: COCO) -> tuple[int, int]:
    """(boxes that train, boxes dropped for no width or height once clamped to their image).

    Non-crowd annotations of the listed images only; clamped to the JSON's width/height.
    """
    anns = [a for a in coco.dataset["annotations"] if not a.get("iscrowd", 0) and a["image_id"] in coco.imgs]
    if not anns:
        return 0, 0
    boxes = box_array([a["bbox"] for a in anns])
    known = np.fromiter(coco.imgs.keys(), np.int64, count=len(coco.imgs))
    sizes = np.asarray([[info.get("width", np.inf), info.get("height", np.inf)] for info in coco.imgs.values()],
                       dtype=np.float64).reshape(-1, 2)
    order = np.argsort(known)
    image_ids = np.fromiter((a["image_id"] for a in anns), np.int64, count=len(anns))
    limits = sizes[order[np.searchsorted(known, image_ids, sorter=order)]]
    x0, y0 = boxes[:, 0].clip(0, limits[:, 0]), boxes[:, 1].clip(0, limits[:, 1])
    x1 = (boxes[:, 0] + boxes[:, 2]).clip(0, limits[:, 0])
    y1 = (boxes[:, 1] + boxes[:, 3]).clip(0, limits[:, 1])
    usable = int(np.count_nonzero((x1 > x0) & (y1 > y0)))
    return usable, len(anns) - usable


def _size_note(file_name: str, given: tuple[int, int], actual: tuple[int, int]) -> str:
    note = f"{file_name} is {actual[0]}x{actual[1]} but the annotation file says {given[0]}x{given[1]}"
    if given == actual[::-1]:
        note += ", width and height swapped: an EXIF rotation the labelling tool did not apply?"
    return note


def check_category_ids(coco: COCO, num_classes: int, ann_file: str | Path) -> None:
    """Raise, naming the first offending annotation, if a category id does not fit num_classes."""
    for ann in coco.dataset["annotations"]:
        category = ann.get("category_id")
        if not isinstance(category, int) or category < 0 or category >= num_classes:
            file_name = coco.imgs.get(ann.get("image_id"), {}).get("file_name", "?")
            raise ValueError(
                f"{ann_file}: annotation id {ann.get('id')} (image {file_name}) has category id "
                f"{category}, but the model has num_classes={num_classes} (valid ids 0.."
                f"{num_classes - 1}); pass --num_classes {max_category_id(coco) + 1} (max category "
                f"id + 1) or fix the annotation")


def max_category_id(coco: COCO) -> int:
    """Largest category id among the categories and the annotations (-1 when there are none)."""
    ids = [c["id"] for c in coco.dataset["categories"]]
    ids += [a["category_id"] for a in coco.dataset["annotations"] if isinstance(a.get("category_id"), int)]
    return max(ids, default=-1)


class CocoDetection(torch.utils.data.Dataset):
    """Images of `img_folder` listed in `ann_file`, in the order of their sorted image ids.

    Item: `transforms(image uint8 [3,H,W], target)` (untransformed target when transforms is None).
    Attributes: `coco` (pycocotools index, also the evaluation ground truth), `ids`,
    `category_names` {id: name}, `num_boxes` (boxes that train), `degenerate_boxes` (count of
    dropped boxes). `check_ready` checks files, sizes and emptiness before a run.
    """

    def __init__(self, img_folder: str | Path, ann_file: str | Path, transforms: Callable | None,
                 return_masks: bool = False, num_classes: int | None = None, coco: COCO | None = None):
        """coco: the ground truth already indexed (e.g. converted from YOLO labels); `ann_file`
        then only names where it came from, in messages."""
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.img_folder} (images of {self.ann_file})")
        self.coco = coco if coco is not None else load_coco_api(self.ann_file)
        self._sizes_from_json = coco is None  # an index given here took its sizes from the pictures
        self.ids = sorted(self.coco.imgs.keys())
        self.category_names = {c["id"]: c.get("name", str(c["id"])) for c in self.coco.dataset["categories"]}
        if num_classes is not None:
            check_category_ids(self.coco, num_classes, self.ann_file)
        self.num_boxes, self.degenerate_boxes = count_boxes(self.coco)
        if self.degenerate_boxes:
            logger.warning("%s: %d box(es) with width or height <= 0 after clamping to the image "
                           "are dropped", self.ann_file, self.degenerate_boxes)
        orphans, first = orphan_annotations(self.coco.dataset)
        if orphans:
            logger.warning("%s: %d annotation(s) refer to an image id not in 'images' and are not used (first: "
                           "annotation id %s, image_id %s); add the images or remove the annotations",
                           self.ann_file, orphans, first["id"], first["image_id"])
        self._transforms = transforms
        self.prepare = ConvertCocoPolysToMask(return_masks)
        self.copy_paste = 0  # --copy_paste N: objects pasted from another image (training set only)
        self.object_augment = None  # --mosaic / --box_paste (datasets/object_augment.py, training set only)
        self._size_noted: set[int] = set()

    def check_ready(self, image_set: str) -> None:
        """Before training: every listed picture is in the folder, the split has images and boxes to
        learn or score, and (splits up to SIZE_CHECK_LIMIT images) each picture has the JSON's size.

        Raises ValueError naming the annotation file, the entry and the fix.
        """
        infos = [self.coco.imgs[i] for i in self.ids]
        missing = missing_files(self.img_folder, [info["file_name"] for info in infos])
        if missing:
            raise ValueError(describe_missing(missing, len(infos), self.img_folder, self.ann_file))
        why = ("there is nothing to learn" if image_set == "train"
               else "COCO AP is undefined without ground truth (it would read -1)")
        if not infos:
            raise ValueError(f"{self.ann_file}: the {image_set} split lists no images: {why}; give the annotation "
                             "file of that split")
        if self.num_boxes == 0:
            raise ValueError(f"{self.ann_file}: the {image_set} split has {len(infos)} image(s) but no boxes "
                             f"({len(self.coco.dataset['annotations'])} annotation(s), none a non-crowd box "
                             f"with width and height on a listed image): {why}; annotate the pictures or give "
                             "the right annotation file")
        if self._sizes_from_json and len(infos) <= SIZE_CHECK_LIMIT:
            self._check_sizes(infos)

    def _check_sizes(self, infos: list[dict]) -> None:
        wrong = []
        for info in infos:
            if "width" in info and "height" in info:
                given = (int(info["width"]), int(info["height"]))
                actual = upright_size(self.img_folder / info["file_name"])
                if given != actual:
                    wrong.append(_size_note(info["file_name"], given, actual))
        if wrong:
            raise ValueError(f"{self.ann_file}: {len(wrong)} of {len(infos)} picture(s) differ from the width/height "
                             f"given for them (first: {wrong[0]}); the boxes were drawn for the given size and "
                             "would land on the wrong pixels: correct width/height, or re-export the annotations "
                             "for the pictures as they are now")

    def _note_size(self, image_id: int, info: dict, height: int, width: int) -> None:
        """Warn once per picture whose decoded size is not the JSON's (its boxes are used as given)."""
        if "width" not in info or "height" not in info or image_id in self._size_noted:
            return
        given = (int(info["width"]), int(info["height"]))
        if given != (width, height):
            self._size_noted.add(image_id)
            logger.warning("%s: %s; its boxes are used as given", self.ann_file,
                           _size_note(info["file_name"], given, (width, height)))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image, target = self.load(index)
        if self.object_augment is not None:
            image, target = self.object_augment(self, image, target)
        if self.copy_paste > 0:
            image, target = self._paste_from_another_image(image, target)
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        return image, target

    def load(self, index: int) -> tuple[torch.Tensor, dict]:
        """Item `index` as decoded, before any augmentation: (uint8 [3,H,W], target, absolute xyxy boxes)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = decode_image(self.img_folder / info["file_name"], self.ann_file)
        annotations = self.coco.imgToAnns.get(image_id, [])
        height, width = int(image.shape[-2]), int(image.shape[-1])
        self._note_size(image_id, info, height, width)
        try:
            target = self.prepare((height, width), image_id, annotations)
        except ValueError as error:
            raise ValueError(f"{self.ann_file} (image {info['file_name']}): {error}") from None
        return image, target

    def _paste_from_another_image(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        """Up to `copy_paste` objects of a random training image, cut along their polygons."""
        source_id = self.ids[int(torch.randint(0, len(self.ids), (1,)))]
        anns = [a for a in self.coco.imgToAnns.get(source_id, [])
                if not a.get("iscrowd", 0) and a.get("segmentation")]
        if not anns:
            return image, target
        info = self.coco.imgs[source_id]
        source = decode_image(self.img_folder / info["file_name"], self.ann_file)
        height, width = int(source.shape[-2]), int(source.shape[-1])
        objects = []
        for i in torch.randperm(len(anns))[:self.copy_paste].tolist():
            try:
                mask = segmentation_to_mask(anns[i]["segmentation"], height, width)
            except ValueError as error:
                raise ValueError(f"{self.ann_file} (image {info['file_name']}): annotation id "
                                 f"{anns[i].get('id')}: {error}") from None
            objects.append((torch.from_numpy(mask).bool(), int(anns[i]["category_id"])))
        return paste_objects(image, target, source, objects)


def build(image_set: str, args) -> CocoDetection:
    """The original's --coco_path layout; `args.masks`, `args.image_scale`, `args.num_classes` read."""
    if not getattr(args, "coco_path", None):
        raise ValueError("--dataset_file coco needs --coco_path (a folder with train2017/, val2017/ "
                         "and annotations/instances_{train,val}2017.json)")
    root = Path(args.coco_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--coco_path {root} does not exist")
    folders = {
        "train": (root / "train2017", root / "annotations" / "instances_train2017.json"),
        "val": (root / "val2017", root / "annotations" / "instances_val2017.json"),
    }
    if image_set not in folders:
        raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
    img_folder, ann_file = folders[image_set]
    num_classes = getattr(args, "num_classes", None) or COCO_NUM_CLASSES
    return CocoDetection(img_folder, ann_file,
                         transforms=transforms_from_args(image_set, args),
                         return_masks=bool(getattr(args, "masks", False)), num_classes=num_classes)
