"""Checks of annotation data before any training: a bad entry is refused naming the file, the entry
and the fix; usable oddities are counted in a one-line note.

One pass over the JSON dict and one listing per image folder: cheap even on COCO's 118k images
(no image is opened here; datasets.coco compares picture sizes where it reads them).
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np


def read_utf8_text(path: Path) -> str:
    """The file as text (UTF-8, a byte-order mark dropped); not UTF-8 is a ValueError naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                         f"{err.start}); save the file as UTF-8") from None


def load_json(path: Path) -> object:
    """json.load of a UTF-8 file (a byte-order mark dropped); not UTF-8 is read_utf8_text's ValueError."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except UnicodeDecodeError:
        read_utf8_text(path)  # raises, naming the line and the byte
        raise


def number(value: object) -> bool:
    """A finite int or float (not a bool, string or None)."""
    return type(value) in (int, float) and math.isfinite(value)


def _first_duplicate(values: list) -> object:
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def _list_of_dicts(dataset: dict, key: str, ann_file: Path) -> list[dict]:
    entries = dataset[key]
    if not isinstance(entries, list):
        raise ValueError(f"{ann_file}: '{key}' is a {type(entries).__name__}, expected a list of objects")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{ann_file}: '{key}' entry {index} is {repr(entry)[:80]}, expected an object")
    return entries


def _check_ids(entries: list[dict], key: str, ann_file: Path, shown: str, fix: str) -> None:
    """Every entry of `key` has an integer 'id', each used once; a repeat names the `shown` field of both."""
    for index, entry in enumerate(entries):
        if type(entry.get("id")) is not int:
            raise ValueError(f"{ann_file}: '{key}' entry {index} ({shown} {entry.get(shown)!r}) has id "
                             f"{entry.get('id')!r}, expected an integer; give every entry a unique integer id")
    duplicate = _first_duplicate([e["id"] for e in entries])
    if duplicate is not None:
        twice = [e.get(shown) for e in entries if e["id"] == duplicate][:2]
        raise ValueError(f"{ann_file}: '{key}' id {duplicate} is used twice ({shown} {twice[0]!r} and "
                         f"{twice[1]!r}); {fix}")


def check_instances(dataset: dict, ann_file: Path) -> None:
    """Refuse a COCO instances dict whose entries would train or evaluate on the wrong thing.

    Images: unique integer ids, unique non-empty file_name, width/height (when given) positive
    numbers. Categories: unique integer ids. Annotations: unique integer ids, integer image_id,
    category_id listed in 'categories', bbox of 4 finite numbers, iscrowd 0/1, finite area.
    """
    images = _list_of_dicts(dataset, "images", ann_file)
    annotations = _list_of_dicts(dataset, "annotations", ann_file)
    categories = _list_of_dicts(dataset, "categories", ann_file)
    _check_ids(images, "images", ann_file, "file_name", "each picture needs its own id (renumber the images "
               "and their annotations' image_id, or remove the repeated entry)")
    for image in images:
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{ann_file}: image id {image['id']} has file_name {name!r}; give the picture's "
                             "path relative to the image folder")
        for key in ("width", "height"):
            if key in image and not (number(image[key]) and image[key] > 0):
                raise ValueError(f"{ann_file}: image id {image['id']} ({name}) has {key} {image[key]!r}; "
                                 f"give the picture's {key} in pixels (or leave the key out)")
    duplicate = _first_duplicate([image["file_name"] for image in images])
    if duplicate is not None:
        ids = [image["id"] for image in images if image["file_name"] == duplicate]
        raise ValueError(f"{ann_file}: file_name {duplicate} is listed {len(ids)} times (image ids "
                         f"{', '.join(map(str, ids))}), so its boxes would be split between them; keep one "
                         "entry and point the annotations' image_id at it")
    _check_ids(categories, "categories", ann_file, "name", "each category needs its own id (merge or renumber "
               "them)")
    _check_ids(annotations, "annotations", ann_file, "image_id", "annotation ids must be unique across the file "
               "(pycocotools keeps only one of them in evaluation): renumber them")
    category_ids = {c["id"] for c in categories}
    if not _annotation_fields_ok(annotations, category_ids):
        _name_bad_annotation_field(annotations, category_ids, ann_file)
    _check_boxes(annotations, ann_file)


def _annotation_fields_ok(annotations: list[dict], category_ids: set[int]) -> bool:
    """image_id, category_id, iscrowd and area of all annotations at once (sets of values and types)."""
    try:
        categories = {ann.get("category_id") for ann in annotations}
        crowd = {ann.get("iscrowd", 0) for ann in annotations}
    except TypeError:  # a list or object where a number belongs
        return False
    areas = [ann["area"] for ann in annotations if "area" in ann]
    return ({type(ann.get("image_id")) for ann in annotations} <= {int}
            and {type(c) for c in categories} <= {int} and categories <= category_ids and crowd <= {0, 1}
            and {type(a) for a in areas} <= {int, float}
            and bool(np.isfinite(np.fromiter(areas, np.float64, count=len(areas))).all()))


def _name_bad_annotation_field(annotations: list[dict], category_ids: set[int], ann_file: Path) -> None:
    for ann in annotations:
        where = f"{ann_file}: annotation id {ann['id']}"
        if type(ann.get("image_id")) is not int:
            raise ValueError(f"{where} has image_id {ann.get('image_id')!r}, expected the integer id of an "
                             "entry of 'images'")
        category = ann.get("category_id")
        if type(category) is not int or category not in category_ids:
            listed = ", ".join(map(str, sorted(category_ids)[:20])) or "none"
            raise ValueError(f"{where} has category_id {category!r}, which is not an id of 'categories' "
                             f"(listed: {listed}); add the category or fix the annotation")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise ValueError(f"{where} has iscrowd {ann['iscrowd']!r}, expected 0 or 1")
        if "area" in ann and not number(ann["area"]):
            raise ValueError(f"{where} has area {ann['area']!r}, expected a finite number (pixels)")


def box_array(boxes: list[list]) -> np.ndarray:
    """[N,4] float64 of N boxes already known to be lists of 4 numbers."""
    return np.fromiter(itertools.chain.from_iterable(boxes), np.float64, count=4 * len(boxes)).reshape(-1, 4)


def _check_boxes(annotations: list[dict], ann_file: Path) -> None:
    """Every bbox is [x, y, w, h] of 4 finite numbers (a pass over all at once; the loop only finds the culprit)."""
    boxes = [ann.get("bbox") for ann in annotations]
    if (all(type(box) is list and len(box) == 4 for box in boxes)
            and {type(v) for box in boxes for v in box} <= {int, float} and np.isfinite(box_array(boxes)).all()):
        return
    for ann, box in zip(annotations, boxes):
        if not (isinstance(box, list) and len(box) == 4 and all(number(v) for v in box)):
            raise ValueError(f"{ann_file}: annotation id {ann['id']} has bbox {box!r}, expected [x, y, width, "
                             "height]: 4 finite numbers in pixels")


def orphan_annotations(dataset: dict) -> tuple[int, dict | None]:
    """(annotations whose image_id is not among the images, the first of them)."""
    image_ids = {image["id"] for image in dataset["images"]}
    orphans = [ann for ann in dataset["annotations"] if ann["image_id"] not in image_ids]
    return len(orphans), (orphans[0] if orphans else None)


def missing_files(folder: Path, file_names: list[str]) -> list[str]:
    """The names (relative to `folder`) that are not files there, listing each folder once."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for name in file_names:
        path = folder / name
        parent = path.parent
        if parent not in listings:
            try:
                listings[parent] = set(os.listdir(parent))
            except OSError:
                listings[parent] = set()
        if path.name not in listings[parent] and not path.is_file():  # is_file: case-insensitive file systems
            missing.append(name)
    return missing


def describe_missing(missing: list[str], total: int, folder: Path, listed_in: Path, what: str = "image") -> str:
    """One line: how many of the listed files are not in the folder, the first few, and the fix."""
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    return (f"{listed_in} lists {len(missing)} {what} file(s) of {total} that are not in {folder} ({shown}); "
            "add the files, give the folder that holds them, or remove the entries")
