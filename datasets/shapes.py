"""The embedded dataset: coloured circles, squares and triangles over sky and ground.

Generated deterministically (seeded) on first use, laid out like COCO so every COCO path runs on it:
    ROOT/train2017/*.jpg, ROOT/val2017/*.jpg
    ROOT/annotations/instances_{train,val}2017.json   things only, polygon segmentations
    ROOT/annotations/panoptic_{train,val}2017.json    things + stuff, segments_info
    ROOT/panoptic_{train,val}2017/*.png               segment ids as id = R + 256 G + 256^2 B
    ROOT/shapes.json                                  the generation parameters (written last)
Categories: 1 circle, 2 square, 3 triangle (things), 4 sky, 5 ground (stuff, panoptic only).
Variants (tools/convergence.py draws its benchmark sets with them; the defaults give the files above):
other shape kinds and category ids (`kinds`, `first_category_id`), object counts and sizes
(`max_objects`, `radius`), colours that say nothing about the class (`colours="random"`), a
colour per class drawn at random for the dataset instead of the fixed ones (`colours="palette"`), and
boxes-only instance files (`boxes_only`: no `segmentation`, as many YOLO and COCO exports).
Generation happens in a temporary sibling folder renamed into place, so an interrupted run
never leaves a half-written dataset; a folder holding another generation is an error.

    python -m datasets.shapes --out data/shapes --train_size 256 --val_size 64 --image_size 128
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 1
THINGS = {1: ("circle", (220, 40, 40)), 2: ("square", (40, 70, 220)), 3: ("triangle", (240, 200, 30))}
STUFF = {4: ("sky", (150, 200, 240)), 5: ("ground", (90, 140, 60))}
MAX_OBJECTS = 5
# Every shape kind the generator draws, with its class colour (the default kinds are THINGS').
KIND_COLOURS = {"circle": (220, 40, 40), "square": (40, 70, 220), "triangle": (240, 200, 30),
                "pentagon": (200, 60, 200), "hexagon": (30, 190, 190), "star": (250, 130, 20),
                "cross": (120, 60, 20)}
DEFAULT_STYLE = {"kinds": ["circle", "square", "triangle"], "first_category_id": 1, "max_objects": MAX_OBJECTS,
                 "radius": [0.1, 0.25], "colours": "class", "boxes_only": False}


def _shape_polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices (x, y) of a shape centred at (cx, cy) with circumradius `radius`."""
    if kind in ("star", "cross"):
        # star: 5 points, inner radius 0.45; cross: 12 corners of a plus sign with arms 0.35 wide
        radii = [1.0, 0.45] * 5 if kind == "star" else [1.0, 1.0, 0.5] * 4
        turns = ([k / 10 for k in range(10)] if kind == "star" else
                 [q / 4 + d for q in range(4) for d in (-0.0595, 0.0595, 0.125)])
        start = angle - math.pi / 2
        return [(cx + radius * r * math.cos(start + 2 * math.pi * t),
                 cy + radius * r * math.sin(start + 2 * math.pi * t)) for r, t in zip(radii, turns)]
    sides = {"circle": 32, "square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6}[kind]
    start = angle + (math.pi / 4 if kind == "square" else -math.pi / 2)
    return [(cx + radius * math.cos(start + 2 * math.pi * k / sides),
             cy + radius * math.sin(start + 2 * math.pi * k / sides)) for k in range(sides)]


def _overlap(a: list[float], b: list[float]) -> float:
    """Intersection area of xyxy boxes a and b over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def class_colours(style: dict, seed: int) -> dict[str, tuple[int, int, int]]:
    """{kind: RGB} each class is drawn in (before jitter): KIND_COLOURS, or with colours="palette" a
    colour per kind drawn from `seed` alone, so both splits of a dataset share it."""
    if style["colours"] != "palette":
        return {kind: KIND_COLOURS[kind] for kind in style["kinds"]}
    drawn = np.random.default_rng([seed, 2]).integers(0, 256, (len(style["kinds"]), 3))
    return {kind: tuple(int(c) for c in rgb) for kind, rgb in zip(style["kinds"], drawn)}


def _draw_scene(rng: np.random.Generator, image_size: int, style: dict, colours: dict):
    """One image: (RGB uint8 [H,W,3], segment-id map int32 [H,W], segments, things).

    segments: [(segment id, category id)] in id order; things: [(category id, polygon)].
    `style`: DEFAULT_STYLE's keys; with the defaults the random draws are those of the original scene.
    `colours`: class_colours' {kind: RGB}.
    """
    kinds, first = style["kinds"], style["first_category_id"]
    aspect = rng.uniform(0.75, 1.33)
    width, height = (image_size, max(16, round(image_size / aspect))) if aspect >= 1 else \
        (max(16, round(image_size * aspect)), image_size)
    horizon = rng.uniform(0.3, 0.7) * height
    tilt = rng.uniform(-0.15, 0.15) * height
    ys, xs = np.mgrid[0:height, 0:width]
    is_sky = ys < horizon + tilt * (xs / width - 0.5)
    pixels = np.where(is_sky[..., None], STUFF[4][1], STUFF[5][1]).astype(np.float32)
    # Vertical shading and noise give the stuff classes a texture instead of flat colour.
    pixels *= (0.85 + 0.3 * ys / height)[..., None]
    pixels += rng.normal(0, 6, pixels.shape)
    ids = np.where(is_sky, 4000, 5000).astype(np.int32)

    count = 0 if rng.random() < 0.1 else int(rng.integers(1, style["max_objects"] + 1))
    things, placed = [], []
    short = min(width, height)
    for _ in range(count * 10):
        if len(things) == count:
            break
        category = int(rng.integers(first, first + len(kinds)))
        radius = rng.uniform(*style["radius"]) * short
        cx, cy = rng.uniform(radius * 0.7, width - radius * 0.7), rng.uniform(radius * 0.7, height - radius * 0.7)
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if any(_overlap(box, other) > 0.35 for other in placed):
            continue
        placed.append(box)
        things.append((category, _shape_polygon(kinds[category - first], cx, cy, radius, rng.uniform(0, 2 * math.pi))))

    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    id_map = Image.fromarray(ids)
    id_draw = ImageDraw.Draw(id_map)
    for index, (category, polygon) in enumerate(things):
        if style["colours"] == "random":  # colour says nothing about the class: only the shape does
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        else:
            jitter = rng.integers(-25, 26, 3)
            colour = tuple(int(c) for c in np.clip(np.array(colours[kinds[category - first]]) + jitter, 0, 255))
        draw.polygon(polygon, fill=colour)
        id_draw.polygon(polygon, fill=category * 1000 + index + 1)
    segments = [(4000, 4), (5000, 5)] + [(c * 1000 + i + 1, c) for i, (c, _) in enumerate(things)]
    return np.asarray(canvas), np.asarray(id_map, dtype=np.int32), segments, things


def _ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def categories(with_stuff: bool, style: dict = DEFAULT_STYLE, colours: dict | None = None) -> list[dict]:
    """The COCO 'categories' entries: things (and, for panoptic, stuff) with isthing and colour."""
    colours = colours or KIND_COLOURS
    cats = [{"id": style["first_category_id"] + k, "name": n, "supercategory": "shape", "isthing": 1,
             "color": list(colours[n])} for k, n in enumerate(style["kinds"])]
    if with_stuff:
        cats += [{"id": i, "name": n, "supercategory": "background", "isthing": 0, "color": list(c)}
                 for i, (n, c) in STUFF.items()]
    return cats


def _write_split(root: Path, split: str, size: int, image_size: int, seed: int, style: dict = DEFAULT_STYLE) -> None:
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    colours = class_colours(style, seed)
    image_dir, png_dir = root / f"{split}2017", root / f"panoptic_{split}2017"
    image_dir.mkdir()
    png_dir.mkdir()
    images, instances, panoptic = [], [], []
    for image_id in range(1, size + 1):
        pixels, id_map, segments, things = _draw_scene(rng, image_size, style, colours)
        height, width = id_map.shape
        file_name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=90)
        Image.fromarray(_ids_to_rgb(id_map)).save(png_dir / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for category, polygon in things:
            flat = [round(v, 2) for xy in polygon for v in xy]
            rle = coco_mask.frPyObjects([flat], height, width)
            x, y, w, h = coco_mask.toBbox(rle)[0].tolist()
            instance = {"id": len(instances) + 1, "image_id": image_id, "category_id": category,
                        "segmentation": [flat], "area": float(coco_mask.area(rle)[0]),
                        "bbox": [x, y, w, h], "iscrowd": 0}
            if style["boxes_only"]:
                del instance["segmentation"]
            instances.append(instance)
        infos = []
        for segment_id, category in segments:
            ys, xs = np.nonzero(id_map == segment_id)
            if len(xs) == 0:  # hidden by later shapes or a band outside the picture
                continue
            x0, y0 = int(xs.min()), int(ys.min())
            infos.append({"id": segment_id, "category_id": category, "iscrowd": 0, "area": int(len(xs)),
                          "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]})
        panoptic.append({"image_id": image_id, "file_name": f"{image_id:06d}.png", "segments_info": infos})
    annotations = root / "annotations"
    with open(annotations / f"instances_{split}2017.json", "w") as f:
        json.dump({"images": images, "annotations": instances, "categories": categories(False, style, colours)}, f)
    with open(annotations / f"panoptic_{split}2017.json", "w") as f:
        json.dump({"images": images, "annotations": panoptic, "categories": categories(True, style, colours)}, f)


def scene_style(**changes) -> dict:
    """DEFAULT_STYLE with `changes` (kinds, first_category_id, max_objects, radius, colours,
    boxes_only), checked: a bad value is a ValueError naming the field and what is allowed."""
    unknown = set(changes) - set(DEFAULT_STYLE)
    if unknown:
        raise ValueError(f"shapes: unknown style field(s) {sorted(unknown)}; known: {sorted(DEFAULT_STYLE)}")
    style = {**DEFAULT_STYLE, **changes}
    style["kinds"], style["radius"] = list(style["kinds"]), [float(r) for r in style["radius"]]
    bad_kinds = [k for k in style["kinds"] if k not in KIND_COLOURS]
    if not style["kinds"] or bad_kinds or len(set(style["kinds"])) != len(style["kinds"]):
        raise ValueError(f"shapes: kinds {style['kinds']}: give distinct names among {sorted(KIND_COLOURS)}")
    ids = range(style["first_category_id"], style["first_category_id"] + len(style["kinds"]))
    if style["first_category_id"] < 1 or set(ids) & set(STUFF):
        raise ValueError(f"shapes: first_category_id {style['first_category_id']} gives thing ids {list(ids)}; "
                         f"they must be >= 1 and avoid the stuff ids {sorted(STUFF)}")
    if style["max_objects"] < 1 or not 0 < style["radius"][0] <= style["radius"][1] <= 0.5:
        raise ValueError(f"shapes: max_objects {style['max_objects']} must be >= 1 and radius {style['radius']} "
                         "a [min, max] fraction of the short side with 0 < min <= max <= 0.5")
    if style["colours"] not in ("class", "random", "palette"):
        raise ValueError(f"shapes: colours {style['colours']!r}: 'class' (a colour per class), 'random' (any "
                         "colour) or 'palette' (a colour per class drawn from the seed)")
    return style


def ensure_shapes(root: str | Path, train_size: int = 256, val_size: int = 64, image_size: int = 128,
                  seed: int = 0, **style_changes) -> Path:
    """The dataset folder `root`, generated first if absent; returns `root` as a Path.

    `style_changes`: scene_style's fields (another kind of data; none = the default files).
    A folder generated with the same parameters is reused as it is; one holding another
    generation (or other files) raises ValueError naming both, since mixing would be silent.
    """
    root = Path(root)
    style = scene_style(**style_changes)
    params = {"format_version": FORMAT_VERSION, "train_size": int(train_size), "val_size": int(val_size),
              "image_size": int(image_size), "seed": int(seed)}
    # Only fields that differ from the defaults are recorded, so a default folder's marker is unchanged.
    params.update({k: v for k, v in style.items() if v != DEFAULT_STYLE[k]})
    if min(train_size, val_size) < 1 or image_size < 16:
        raise ValueError(f"shapes: need train_size, val_size >= 1 and image_size >= 16, got {params}")
    existing = _read_marker(root)
    if existing == params:
        return root
    if existing is not None or (root.exists() and any(root.iterdir())):
        raise ValueError(
            f"{root} already holds {'shapes data generated with ' + json.dumps(existing) if existing else 'other files'}, "
            f"not the requested {json.dumps(params)}; pass another --data_path or delete {root}")
    # Minutes at large sizes: say what is happening before the first line of training output.
    print(f"shapes: generating {train_size} training and {val_size} validation images "
          f"({image_size} px long side, seed {seed}) in {root.resolve()} (once; later runs reuse it)", flush=True)
    started = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "annotations").mkdir()
        for split, size in (("train", train_size), ("val", val_size)):
            _write_split(tmp, split, size, image_size, seed, style)
        (tmp / "shapes.json").write_text(json.dumps(params))
        try:
            if root.exists():
                root.rmdir()  # empty when checked above; os.rename needs it gone
            os.rename(tmp, root)
        except OSError:
            # Another process (a second rank) finished first and filled `root` since the check
            # above: use its copy if it is the same data.
            if _read_marker(root) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"shapes: done in {time.perf_counter() - started:.1f} s", flush=True)
    return root


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / "shapes.json").read_text())
    except (OSError, ValueError):
        return None


def ensure_from_args(args) -> Path:
    """ensure_shapes with args.data_path and the args.shapes_* sizes (defaults where absent)."""
    return ensure_shapes(getattr(args, "data_path", None) or "data/shapes",
                         train_size=getattr(args, "shapes_train_size", 256),
                         val_size=getattr(args, "shapes_val_size", 64),
                         image_size=getattr(args, "shapes_image_size", 128),
                         seed=getattr(args, "shapes_seed", 0))


def build(image_set: str, args):
    """`--dataset_file shapes`: COCO detection (instance masks with --masks) over the generated data."""
    from datasets.coco import CocoDetection
    from datasets.transforms import transforms_from_args

    root = ensure_from_args(args)
    return CocoDetection(root / f"{image_set}2017", root / "annotations" / f"instances_{image_set}2017.json",
                         transforms=transforms_from_args(image_set, args),
                         return_masks=bool(getattr(args, "masks", False)),
                         num_classes=getattr(args, "num_classes", None))


def build_panoptic(image_set: str, args):
    """`--dataset_file shapes_panoptic`: panoptic targets (things and stuff) over the generated data."""
    from datasets.coco_panoptic import CocoPanoptic
    from datasets.transforms import transforms_from_args

    root = ensure_from_args(args)
    return CocoPanoptic(root / f"{image_set}2017", root / f"panoptic_{image_set}2017",
                        root / "annotations" / f"panoptic_{image_set}2017.json",
                        transforms=transforms_from_args(image_set, args),
                        return_masks=bool(getattr(args, "masks", True)),
                        num_classes=getattr(args, "num_classes", None))


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the shapes dataset (COCO layout).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="data/shapes", help="dataset folder to create")
    parser.add_argument("--train_size", type=int, default=256, help="training images")
    parser.add_argument("--val_size", type=int, default=64, help="validation images")
    parser.add_argument("--image_size", type=int, default=128, help="long side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same files)")
    parser.add_argument("--kinds", nargs="+", default=DEFAULT_STYLE["kinds"], choices=sorted(KIND_COLOURS),
                        help="shape kinds, one class each")
    parser.add_argument("--first_category_id", type=int, default=1, help="category id of the first kind")
    parser.add_argument("--max_objects", type=int, default=MAX_OBJECTS, help="most objects per image")
    parser.add_argument("--radius", type=float, nargs=2, default=DEFAULT_STYLE["radius"],
                        help="object radius range as fractions of the short side")
    parser.add_argument("--colours", default="class", choices=("class", "random", "palette"),
                        help="class: a fixed colour per class (jittered); random: any colour, only the shape "
                             "tells; palette: a colour per class drawn from --seed (jittered)")
    parser.add_argument("--boxes_only", action="store_true", help="instances JSON without 'segmentation'")
    args = parser.parse_args()
    root = ensure_shapes(args.out, args.train_size, args.val_size, args.image_size, args.seed, kinds=args.kinds,
                         first_category_id=args.first_category_id, max_objects=args.max_objects,
                         radius=args.radius, colours=args.colours, boxes_only=args.boxes_only)
    print(f"shapes dataset ready in {root}")


if __name__ == "__main__":
    from util.cli import exit_on_user_error

    with exit_on_user_error():
        main()
