"""`--dataset_file yolo --data_path ROOT`: a YOLO txt export, read as COCO ground truth in memory.

Layout (as YOLO tools write it):
    ROOT/images/train/*.jpg   ROOT/labels/train/*.txt   one label file per image, same stem
    ROOT/images/val/*.jpg     ROOT/labels/val/*.txt     (subfolders mirrored; none = no objects)
    ROOT/data.yaml            names: [a, b] | names: {0: a, 1: b} | block list/mapping; nc: K
      or ROOT/classes.txt     one name per line
A label line is `class cx cy w h`, the box centre and size as fractions of the image width and
height. data.yaml's `train:` / `val:` may point elsewhere (a folder relative to ROOT; a leading
`../` that leads nowhere is dropped, as Roboflow's `train: ../train/images` means ROOT/train/images);
the label folder is then that path with its last `images` part replaced by `labels`.

Class index k becomes category id k (so the model gets len(names) classes). Each split becomes a
pycocotools COCO index (boxes [x, y, w, h] in pixels, area w*h, iscrowd 0; image ids 1.. in file
order), so training targets and COCO AP are computed exactly as for a COCO-format export.
A label line with the wrong field count, a class index outside the names, a value outside
[0, 1], or text that is not UTF-8 raises ValueError naming the file and the line; so do a missing
labels folder, label files that match no image, two images sharing one label file and a data.yaml
whose nc disagrees with its names. Images without a label file and label files without an image
are counted in a note.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

from pycocotools.coco import COCO

from datasets.annotation_checks import read_utf8_text
from datasets.coco import CocoDetection, upright_size
from datasets.transforms import transforms_from_args

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _scalar(text: str) -> str:
    """A YAML scalar as written in data.yaml: comment dropped, quotes removed."""
    text = text.strip()
    if text[:1] in ("'", '"'):
        return text[1:text.index(text[0], 1)] if text.count(text[0]) > 1 else text[1:]
    return text.split(" #")[0].strip()


def read_data_yaml(path: Path) -> dict[str, object]:
    """The top-level keys of a YOLO data.yaml that matter here: names (list of str), nc, train, val.

    A small reader for the forms YOLO tools write (PyYAML is not a dependency): `key: value`,
    `names: [a, b]`, and `names:` followed by indented `- a` items or `0: a` pairs.
    """
    out: dict[str, object] = {}
    lines = read_utf8_text(path).splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        match = re.match(r"^([A-Za-z_]\w*)\s*:(.*)$", line)
        if not match:
            continue
        key, rest = match.group(1), match.group(2).strip()
        if rest.startswith("#"):
            rest = ""
        if key != "names":
            out[key] = _scalar(rest) if rest else None
            continue
        if rest.startswith("["):
            inner = rest[1:rest.rindex("]")] if "]" in rest else rest[1:]
            out["names"] = [_scalar(item) for item in inner.split(",") if item.strip()]
        elif rest.startswith("{"):
            inner = rest[1:rest.rindex("}")] if "}" in rest else rest[1:]
            pairs = [item.split(":", 1) for item in inner.split(",") if item.strip()]
            out["names"] = _indexed(path, {_index(path, k): _scalar(v) for k, v in pairs})
        else:  # a block: "- name" lines (indented or not) or indented "k: name" lines
            items, indexed = [], {}
            while i < len(lines) and (lines[i].startswith((" ", "\t", "-")) or not lines[i].strip()):
                entry = lines[i].strip()
                i += 1
                if not entry or entry.startswith("#"):
                    continue
                if entry.startswith("-"):
                    items.append(_scalar(entry[1:]))
                elif ":" in entry:
                    k, v = entry.split(":", 1)
                    indexed[_index(path, k)] = _scalar(v)
            out["names"] = items if items else _indexed(path, indexed)
    return out


def _index(path: Path, key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"{path}: names: {key.strip()!r} is not a class index (expected 0, 1, ...)") from None


def _indexed(path: Path, names: dict[int, str]) -> list[str]:
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: names must be numbered 0..{len(names) - 1}, got {sorted(names)}")
    return [names[k] for k in range(len(names))]


def class_names(root: Path) -> list[str]:
    """Class names from ROOT/data.yaml (names, else nc numbered names) or ROOT/classes.txt.

    data.yaml's nc must equal the number of its names.
    """
    for name in ("data.yaml", "data.yml"):
        if (root / name).is_file():
            return _yaml_names(root / name)
    if (root / "classes.txt").is_file():
        return _classes_txt(root / "classes.txt")
    raise FileNotFoundError(f"--dataset_file yolo: no data.yaml or classes.txt in {root} (class names are needed)")


def _classes_txt(path: Path) -> list[str]:
    return [line.strip() for line in read_utf8_text(path).splitlines() if line.strip()]


def _note_other_names(root: Path, names: list[str]) -> None:
    """A classes.txt beside data.yaml that lists other names is noted (data.yaml wins, as in YOLO tools)."""
    if (root / "classes.txt").is_file() and any((root / n).is_file() for n in ("data.yaml", "data.yml")):
        listed = _classes_txt(root / "classes.txt")
        if listed != names:
            logger.warning("%s lists other class names (%s) than data.yaml (%s): data.yaml's are used",
                           root / "classes.txt", ", ".join(listed[:10]), ", ".join(names[:10]))


def _yaml_names(path: Path) -> list[str]:
    config = read_data_yaml(path)
    count = None
    if config.get("nc") is not None:
        try:
            count = int(str(config["nc"]))
        except ValueError:
            raise ValueError(f"{path}: nc: {config['nc']!r} is not a number of classes") from None
    names = list(config.get("names") or [])  # type: ignore[call-overload]
    if names and count is not None and count != len(names):
        raise ValueError(f"{path}: nc: {count} but names lists {len(names)} ({', '.join(names[:10])}); "
                         "make them agree (one name per class index)")
    if names:
        return names
    if count:
        return [str(k) for k in range(count)]
    raise ValueError(f"{path} has neither 'names' nor 'nc'")


def split_folders(root: Path, image_set: str) -> tuple[Path, Path]:
    """(images folder, labels folder) of the 'train' or 'val' split."""
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}: expected 'train' or 'val'")
    images = root / "images" / image_set
    for name in ("data.yaml", "data.yml"):
        if (root / name).is_file():
            given = read_data_yaml(root / name).get(image_set)
            if isinstance(given, str) and given:
                if given.endswith(".txt"):
                    raise ValueError(f"{root / name}: {image_set}: {given} is a list of image files; "
                                     "--dataset_file yolo reads image folders (images/<split>/)")
                images = Path(given) if Path(given).is_absolute() else root / given
                if not images.is_dir() and given.startswith("../"):
                    images = root / given[3:]  # Roboflow writes '../train/images' for ROOT/train/images
            break
    parts = list(images.parts)
    if "images" not in parts:
        raise ValueError(f"--dataset_file yolo: the {image_set} image folder {images} has no 'images' part "
                         "to find its labels folder by")
    last = len(parts) - 1 - parts[::-1].index("images")
    labels = Path(*parts[:last], "labels", *parts[last + 1:])
    if not images.is_dir():
        raise FileNotFoundError(f"--dataset_file yolo: image folder not found: {images}")
    return images, labels


def _read_labels(path: Path, num_names: int) -> list[tuple[int, list[float]]]:
    """[(class index, [cx, cy, w, h])] of a label file; errors name the file and line."""
    boxes = []
    for number, line in enumerate(read_utf8_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {number}"
        if len(fields) != 5:
            raise ValueError(f"{where}: {len(fields)} fields, expected 5 (class cx cy w h); "
                             "segmentation or keypoint labels are not supported")
        try:
            index, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise ValueError(f"{where}: cannot read {line.strip()!r} as an integer class and 4 numbers") from None
        if not 0 <= index < num_names:
            raise ValueError(f"{where}: class index {index} is outside the {num_names} names "
                             f"(0..{num_names - 1}); fix the label or add the name to data.yaml/classes.txt")
        outside = [v for v in values if not 0.0 <= v <= 1.0]
        if outside:
            raise ValueError(f"{where}: {outside[0]} is outside [0, 1]; YOLO labels hold the box centre and "
                             "size as fractions of the image size (pixel coordinates need converting)")
        boxes.append((index, values))
    return boxes


def yolo_to_coco(images: Path, labels: Path, names: list[str]) -> COCO:
    """The split as a pycocotools COCO index: images in sorted path order with ids 1.., boxes in pixels.

    Refused: no images, no labels folder, two images sharing one label file (same stem), label
    files none of which matches an image. Noted with counts: images without a label file (no
    objects, YOLO's convention) and label files without an image (unused).
    """
    files = sorted((p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(images).as_posix())
    if not files:
        raise FileNotFoundError(f"--dataset_file yolo: no images in {images}")
    if not labels.is_dir():
        nearest = next(folder for folder in labels.parents if folder.is_dir())
        raise FileNotFoundError(f"--dataset_file yolo: labels folder not found: {labels} (the labels of {images} "
                                "are looked for in the same path with 'images' replaced by 'labels'; "
                                f"{nearest} holds: {', '.join(sorted(p.name for p in nearest.iterdir())[:10])}); "
                                "put the .txt files there")
    label_of = {path: labels / path.relative_to(images).with_suffix(".txt") for path in files}
    by_label: dict[Path, Path] = {}
    for path, label_file in label_of.items():
        if label_file in by_label:
            raise ValueError(f"--dataset_file yolo: {by_label[label_file]} and {path} share the label file "
                             f"{label_file} (labels are paired with images by name): rename or remove one")
        by_label[label_file] = path
    label_files = {p for p in labels.rglob("*.txt") if p.name != "classes.txt"}
    unlabelled = {path for path, label_file in label_of.items()
                  if label_file not in label_files and not label_file.is_file()}
    if len(unlabelled) == len(files) and label_files:
        example = min(label_files)
        raise ValueError(f"--dataset_file yolo: none of the {len(files)} images in {images} has a label file in "
                         f"{labels} (looked for e.g. {label_of[files[0]].name}; the folder holds {len(label_files)} "
                         f"other .txt files, e.g. {example.name}): name each label file after its image")
    if unlabelled:
        logger.warning("%s: %d of %d images have no label file in %s and count as pictures without objects "
                       "(first: %s)", images, len(unlabelled), len(files), labels,
                       min(unlabelled).relative_to(images).as_posix())
    unused = sorted(label_files - set(label_of.values()))
    if unused:
        logger.warning("%s: %d label file(s) have no image in %s and are not used (first: %s)",
                       labels, len(unused), images, unused[0].relative_to(labels).as_posix())
    dataset: dict[str, list] = {"images": [], "annotations": [],
                                "categories": [{"id": k, "name": n} for k, n in enumerate(names)]}
    for image_id, path in enumerate(files, start=1):
        relative = path.relative_to(images)
        width, height = upright_size(path)
        dataset["images"].append({"id": image_id, "file_name": relative.as_posix(), "width": width, "height": height})
        label_file = label_of[path]
        if path in unlabelled:
            continue
        for index, (cx, cy, w, h) in _read_labels(label_file, len(names)):
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            dataset["annotations"].append({"id": len(dataset["annotations"]) + 1, "image_id": image_id,
                                           "category_id": index, "bbox": box, "area": box[2] * box[3],
                                           "iscrowd": 0})
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _root(args) -> Path:
    root = Path(getattr(args, "data_path", "") or "")
    if not root.is_dir():
        raise FileNotFoundError(f"--dataset_file yolo needs --data_path ROOT (a folder with images/, labels/ "
                                f"and data.yaml or classes.txt); {root} is not a folder")
    return root


def required_num_classes(args) -> tuple[int, int]:
    """(number of names, the largest class index)."""
    names = class_names(_root(args))
    return len(names), len(names) - 1


def category_names(args) -> dict[int, str]:
    return dict(enumerate(class_names(_root(args))))


def build(image_set: str, args) -> CocoDetection:
    """CocoDetection over the split's images with the converted labels as its ground truth."""
    if getattr(args, "masks", False):
        raise ValueError("--dataset_file yolo holds boxes only: --masks needs a COCO-format export with "
                         "segmentations (--dataset_file custom)")
    root = _root(args)
    names = class_names(root)
    if image_set == "train":
        _note_other_names(root, names)
    images, labels = split_folders(root, image_set)
    return CocoDetection(images, labels, transforms=transforms_from_args(image_set, args),
                         num_classes=getattr(args, "num_classes", None),
                         coco=yolo_to_coco(images, labels, names))
