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
A label line with the wrong field count, a class index outside the names, or a value outside
[0, 1] raises ValueError naming the file and the line.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import PIL.Image
from pycocotools.coco import COCO

from datasets.coco import CocoDetection
from datasets.transforms import transforms_from_args

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


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
    lines = path.read_text(encoding="utf-8").splitlines()
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
    """Class names from ROOT/data.yaml (names, else nc numbered names) or ROOT/classes.txt."""
    for name in ("data.yaml", "data.yml"):
        if (root / name).is_file():
            config = read_data_yaml(root / name)
            if config.get("names"):
                return list(config["names"])  # type: ignore[arg-type]
            if config.get("nc"):
                return [str(k) for k in range(int(config["nc"]))]  # type: ignore[arg-type]
            raise ValueError(f"{root / name} has neither 'names' nor 'nc'")
    if (root / "classes.txt").is_file():
        return [line.strip() for line in (root / "classes.txt").read_text(encoding="utf-8").splitlines()
                if line.strip()]
    raise FileNotFoundError(f"--dataset_file yolo: no data.yaml or classes.txt in {root} (class names are needed)")


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


def _upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as the decoder returns the image (EXIF orientation applied)."""
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"unreadable image {path}: {err}; the file is damaged or not an image") from None
    return (height, width) if orientation in _ROTATED else (width, height)


def _read_labels(path: Path, num_names: int) -> list[tuple[int, list[float]]]:
    """[(class index, [cx, cy, w, h])] of a label file; errors name the file and line."""
    boxes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
    """The split as a pycocotools COCO index: images in sorted path order with ids 1.., boxes in pixels."""
    files = sorted((p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(images).as_posix())
    if not files:
        raise FileNotFoundError(f"--dataset_file yolo: no images in {images}")
    dataset: dict[str, list] = {"images": [], "annotations": [],
                                "categories": [{"id": k, "name": n} for k, n in enumerate(names)]}
    for image_id, path in enumerate(files, start=1):
        relative = path.relative_to(images)
        width, height = _upright_size(path)
        dataset["images"].append({"id": image_id, "file_name": relative.as_posix(), "width": width, "height": height})
        label_file = labels / relative.with_suffix(".txt")
        if not label_file.is_file():  # YOLO's convention: an image without a label file has no objects
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
    images, labels = split_folders(root, image_set)
    return CocoDetection(images, labels, transforms=transforms_from_args(image_set, args),
                         num_classes=getattr(args, "num_classes", None),
                         coco=yolo_to_coco(images, labels, names))
