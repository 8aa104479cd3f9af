"""`--dataset_file custom`: any COCO-format export (images folder + instances JSON) per split.

Flags: --train_images DIR --train_annotations FILE --val_images DIR --val_annotations FILE.
Category ids are used as they are (they may start at 0 or 1 and have gaps); the model gets
max category id + 1 classes unless --num_classes says more. Category names are kept in
`dataset.category_names` for outputs. Items are those of datasets.coco.CocoDetection, which
also refuses the entries that would train on the wrong thing (datasets/annotation_checks.py).
"""
from __future__ import annotations

from pathlib import Path

from datasets.coco import CocoDetection, load_coco_api, max_category_id
from datasets.transforms import transforms_from_args


def split_paths(image_set: str, args) -> tuple[Path, Path]:
    """(images folder, annotation file) of the split from args, with a clear error when unset."""
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
    images = getattr(args, f"{image_set}_images", None)
    annotations = getattr(args, f"{image_set}_annotations", None)
    if not images or not annotations:
        raise ValueError(f"--dataset_file custom needs --{image_set}_images DIR and "
                         f"--{image_set}_annotations FILE (a COCO-format JSON)")
    return Path(images), Path(annotations)


def annotation_files(args) -> list[Path]:
    """The annotation files given (train, then val when set)."""
    files = []
    for image_set in ("train", "val"):
        annotations = getattr(args, f"{image_set}_annotations", None)
        if annotations:
            files.append(Path(annotations))
    if not files:
        raise ValueError("--dataset_file custom needs --train_annotations FILE (and --val_annotations FILE)")
    return files


def required_num_classes(args) -> tuple[int, int]:
    """(max category id + 1 over the given annotation files, that largest id)."""
    largest = max(max_category_id(load_coco_api(f)) for f in annotation_files(args))
    return largest + 1, largest


def category_names(args) -> dict[int, str]:
    """{category id: name} merged over the given annotation files."""
    names: dict[int, str] = {}
    for f in annotation_files(args):
        for c in load_coco_api(f).dataset["categories"]:
            names.setdefault(c["id"], c.get("name", str(c["id"])))
    return names


def build(image_set: str, args) -> CocoDetection:
    """CocoDetection over the split's folder and JSON, with the recipe at args.image_scale."""
    images, annotations = split_paths(image_set, args)
    return CocoDetection(images, annotations,
                         transforms=transforms_from_args(image_set, args),
                         return_masks=bool(getattr(args, "masks", False)),
                         num_classes=getattr(args, "num_classes", None))
