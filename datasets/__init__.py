"""Dataset entry points: build by --dataset_file, the evaluation ground truth, class counts.

--dataset_file: coco, coco_panoptic (the original's), shapes, shapes_panoptic (the embedded
generated data, see datasets/shapes.py), custom (a COCO-format export, see datasets/custom.py),
yolo (a YOLO txt export under --data_path, see datasets/yolo.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from pycocotools.coco import COCO

from datasets import coco, coco_panoptic, custom, object_augment, yolo


def _shapes():
    # Imported on use, so that `python -m datasets.shapes` does not find itself already imported.
    from datasets import shapes
    return shapes

DATASET_FILES = ("coco", "coco_panoptic", "shapes", "shapes_panoptic", "custom", "yolo")


def _kind(args) -> str:
    kind = getattr(args, "dataset_file", "coco")
    if kind not in DATASET_FILES:
        raise ValueError(f"unknown --dataset_file {kind!r}; choose one of {', '.join(DATASET_FILES)}")
    return kind


def build_dataset(image_set: str, args) -> torch.utils.data.Dataset:
    """The 'train' or 'val' dataset of args.dataset_file; items are (image [3,H,W], target).

    A split the run reads is checked before any training (files present, images and boxes in it):
    the training split unless --eval, the val split when it is evaluated (--eval, --eval_every > 0).
    """
    dataset = _build(image_set, args)
    if _is_read(image_set, args):
        dataset.check_ready(image_set)
    paste = getattr(args, "copy_paste", 0)
    if paste and image_set == "train":
        if not isinstance(dataset, coco.CocoDetection):
            raise ValueError(f"--copy_paste {paste}: --dataset_file {_kind(args)} has no instance polygons "
                             "to cut objects out along; use a COCO-format detection set (coco, custom, shapes) "
                             "or --copy_paste 0")
        if not any(a.get("segmentation") for a in dataset.coco.dataset["annotations"]):
            raise ValueError(f"--copy_paste {paste}: {dataset.ann_file} has no 'segmentation' in any annotation "
                             "(boxes only); copy-paste cuts objects along their polygons or RLE: add them, "
                             "or pass --copy_paste 0")
        dataset.copy_paste = paste
    if image_set == "train":
        object_augment.attach(dataset, args)
    return dataset


def _is_read(image_set: str, args) -> bool:
    evaluate_only = getattr(args, "eval", False)
    if image_set == "train":
        return not evaluate_only
    return evaluate_only or getattr(args, "eval_every", 1) > 0


def _build(image_set: str, args) -> torch.utils.data.Dataset:
    kind = _kind(args)
    if kind == "coco":
        return coco.build(image_set, args)
    if kind == "coco_panoptic":
        return coco_panoptic.build(image_set, args)
    if kind == "shapes":
        return _shapes().build(image_set, args)
    if kind == "shapes_panoptic":
        return _shapes().build_panoptic(image_set, args)
    if kind == "yolo":
        return yolo.build(image_set, args)
    return custom.build(image_set, args)


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO ground truth behind a dataset (Subsets unwrapped)."""
    for _ in range(10):
        if not isinstance(dataset, torch.utils.data.Subset):
            break
        dataset = dataset.dataset
    if not hasattr(dataset, "coco"):
        raise TypeError(f"{type(dataset).__name__} has no COCO ground truth (.coco)")
    return dataset.coco


def evaluation_ground_truth(args, dataset_val) -> COCO:
    """The COCO ground truth that box and mask AP are computed against.

    Panoptic kinds score AP against the instance annotations of the same images, as the original
    did for coco_panoptic (--coco_path's instances_val2017.json), so a --masks run reports segm AP
    next to PQ. Without that file, the panoptic segments serve as boxes (segm AP is then skipped).
    """
    kind = _kind(args)
    instances = None
    if kind == "coco_panoptic" and getattr(args, "coco_path", None):
        instances = Path(args.coco_path) / "annotations" / "instances_val2017.json"
    elif kind == "shapes_panoptic":
        instances = _shapes().ensure_from_args(args) / "annotations" / "instances_val2017.json"
    if instances is not None and instances.is_file():
        return coco.load_coco_api(instances)
    return get_coco_api_from_dataset(dataset_val)


def _shapes_categories(panoptic: bool) -> list[dict]:
    # Fixed by the generator: no need to generate (or even find) the data to know them.
    return _shapes().categories(with_stuff=panoptic)


def _required(args) -> tuple[int | None, int | None]:
    """(classes the annotations need, largest category id), None where not read (COCO)."""
    kind = _kind(args)
    if kind in ("shapes", "shapes_panoptic"):
        largest = max(c["id"] for c in _shapes_categories(kind == "shapes_panoptic"))
        return largest + 1, largest
    if kind == "custom":
        return custom.required_num_classes(args)
    if kind == "yolo":
        return yolo.required_num_classes(args)
    return None, None


def infer_num_classes(args) -> int:
    """args.num_classes when given (error if below max category id + 1), else the dataset's count.

    coco: 91, coco_panoptic: 250 (the original's); shapes, shapes_panoptic, custom: max category
    id + 1 from the annotation files; yolo: the number of class names.
    """
    required, largest = _required(args)
    given = getattr(args, "num_classes", None)
    if given is not None:
        if required is not None and given < required:
            raise ValueError(f"--num_classes {given} is too small: the annotations use category id {largest}, "
                             f"so at least --num_classes {required} (max category id + 1) is needed")
        return int(given)
    if required is not None:
        return required
    return coco_panoptic.COCO_PANOPTIC_NUM_CLASSES if _kind(args) == "coco_panoptic" else coco.COCO_NUM_CLASSES


def panoptic_thing_ids(args) -> list[int] | None:
    """Thing category ids for the panoptic post-processor; None means COCO's rule (id <= 90)."""
    if _kind(args) == "shapes_panoptic":
        return sorted(c["id"] for c in _shapes_categories(True) if c.get("isthing", 1))
    return None


def category_names(args) -> dict[int, str]:
    """{category id: name} of the dataset (COCO's from its val annotation file)."""
    kind = _kind(args)
    if kind in ("shapes", "shapes_panoptic"):
        return {c["id"]: c["name"] for c in _shapes_categories(kind == "shapes_panoptic")}
    if kind == "custom":
        return custom.category_names(args)
    if kind == "yolo":
        return yolo.category_names(args)
    if kind == "coco":
        ann = Path(args.coco_path) / "annotations" / "instances_val2017.json"
    else:
        ann = Path(args.coco_panoptic_path) / "annotations" / "panoptic_val2017.json"
    return {c["id"]: c["name"] for c in json.loads(ann.read_text())["categories"]}
