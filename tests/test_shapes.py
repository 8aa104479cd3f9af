"""The embedded shapes dataset: deterministic, COCO layout, consistent instances and panoptic files."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from datasets import build_dataset, infer_num_classes, panoptic_thing_ids
from datasets import shapes
from datasets.coco_panoptic import rgb_to_id


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return shapes.ensure_shapes(tmp_path_factory.mktemp("s") / "shapes", train_size=40, val_size=4, image_size=48)


def _args(root, **kw):
    return argparse.Namespace(dataset_file="shapes", data_path=str(root), shapes_train_size=40, shapes_val_size=4,
                              shapes_image_size=48, image_scale=0.4, masks=False, num_classes=None, **kw)


def test_layout_is_coco_like(root):
    for split, size in (("train", 40), ("val", 4)):
        assert len(list((root / f"{split}2017").glob("*.jpg"))) == size
        assert len(list((root / f"panoptic_{split}2017").glob("*.png"))) == size
        for kind in ("instances", "panoptic"):
            assert (root / "annotations" / f"{kind}_{split}2017.json").is_file()
    with Image.open(root / "train2017" / "000001.jpg") as image:
        assert image.format == "JPEG" and max(image.size) == 48


def test_same_seed_gives_identical_files(root, tmp_path):
    again = shapes.ensure_shapes(tmp_path / "again", train_size=40, val_size=4, image_size=48)
    for name in ("annotations/instances_train2017.json", "annotations/panoptic_val2017.json",
                 "train2017/000007.jpg", "panoptic_train2017/000007.png"):
        assert (root / name).read_bytes() == (again / name).read_bytes()
    other = shapes.ensure_shapes(tmp_path / "other", train_size=40, val_size=4, image_size=48, seed=1)
    assert (root / "train2017/000001.jpg").read_bytes() != (other / "train2017/000001.jpg").read_bytes()


def test_objects_per_image_and_categories(root):
    instances = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    counts = {img["id"]: 0 for img in instances["images"]}
    for ann in instances["annotations"]:
        counts[ann["image_id"]] += 1
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["area"] > 0 and len(ann["segmentation"][0]) >= 6
    assert min(counts.values()) == 0 and max(counts.values()) <= 5  # some images are empty
    assert {a["category_id"] for a in instances["annotations"]} == {1, 2, 3}
    assert [c["name"] for c in instances["categories"]] == ["circle", "square", "triangle"]


def test_panoptic_png_matches_segments_info(root):
    panoptic = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
    isthing = {c["id"]: c["isthing"] for c in panoptic["categories"]}
    assert set(isthing.values()) == {0, 1}
    seen_thing = seen_stuff = False
    for ann in panoptic["annotations"][:10]:
        ids = rgb_to_id(np.asarray(Image.open(root / "panoptic_train2017" / ann["file_name"])))
        listed = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) == set(listed)  # every pixel labelled, no VOID
        for seg in ann["segments_info"]:
            ys, xs = np.nonzero(ids == seg["id"])
            assert seg["area"] == len(xs)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            seen_thing |= bool(isthing[seg["category_id"]])
            seen_stuff |= not isthing[seg["category_id"]]
    assert seen_thing and seen_stuff


def test_reused_when_complete_and_other_parameters_refused(root):
    stamp = (root / "train2017" / "000001.jpg").stat().st_mtime_ns
    assert shapes.ensure_shapes(root, train_size=40, val_size=4, image_size=48) == root
    assert (root / "train2017" / "000001.jpg").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="train_size.*--data_path"):
        shapes.ensure_shapes(root, train_size=41, val_size=4, image_size=48)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_write_split", fail)
    with pytest.raises(KeyboardInterrupt):
        shapes.ensure_shapes(tmp_path / "shapes", train_size=2, val_size=1, image_size=32)
    assert list(tmp_path.iterdir()) == []


def test_dataset_files_shapes_and_coco_read_the_same_data(root):
    args = _args(root)
    via_shapes = build_dataset("val", args)
    via_coco = build_dataset("val", argparse.Namespace(dataset_file="coco", coco_path=str(root), image_scale=0.4,
                                                       masks=False, num_classes=None))
    for i in range(len(via_shapes)):
        a, b = via_shapes[i], via_coco[i]
        assert (a[0] == b[0]).all() and (a[1]["boxes"] == b[1]["boxes"]).all()
    assert infer_num_classes(args) == 4
    panoptic_args = _args(root)
    panoptic_args.dataset_file, panoptic_args.masks = "shapes_panoptic", True
    assert infer_num_classes(panoptic_args) == 6 and panoptic_thing_ids(panoptic_args) == [1, 2, 3]
    image, target = build_dataset("val", panoptic_args)[0]
    assert set(target["labels"].tolist()) & {4, 5} and target["masks"].shape[-2:] == image.shape[-2:]


def test_command_line_entry(tmp_path, repo_root):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "datasets.shapes", "--out", str(out), "--train_size", "3",
                             "--val_size", "2", "--image_size", "32"], cwd=repo_root, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr  # runpy's "found in sys.modules" when datasets imports it first
    assert len(list((out / "train2017").glob("*.jpg"))) == 3
    assert json.loads((out / "shapes.json").read_text())["image_size"] == 32


def test_default_size_generates(tmp_path):
    root = shapes.ensure_shapes(tmp_path / "default")
    assert len(list((root / "train2017").glob("*.jpg"))) == 256
    assert len(list((root / "panoptic_val2017").glob("*.png"))) == 64


def test_second_rank_finishing_first_is_reused(tmp_path, monkeypatch):
    """Two ranks of a fresh torchrun both generate; the one that finishes last keeps the other's copy."""
    target = tmp_path / "shapes"
    target.mkdir()  # an empty folder made by hand (or by a launcher) counts as absent
    real_write = shapes._write_split
    other_rank_done = []

    def write_while_other_rank_finishes(root, split, *args):
        if not other_rank_done:
            other_rank_done.append(True)
            monkeypatch.setattr(shapes, "_write_split", real_write)
            shapes.ensure_shapes(target, train_size=3, val_size=2, image_size=32)  # the other rank, start to end
            monkeypatch.setattr(shapes, "_write_split", write_while_other_rank_finishes)
        real_write(root, split, *args)

    monkeypatch.setattr(shapes, "_write_split", write_while_other_rank_finishes)
    assert shapes.ensure_shapes(target, train_size=3, val_size=2, image_size=32) == target
    assert len(list((target / "train2017").glob("*.jpg"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temporary folder left behind


def test_class_facts_need_no_generated_data(tmp_path):
    """predict.py asks for names and class counts on machines without the data: nothing is generated."""
    from datasets import category_names

    args = _args(tmp_path / "absent")
    assert infer_num_classes(args) == 4 and category_names(args) == {1: "circle", 2: "square", 3: "triangle"}
    args.dataset_file = "shapes_panoptic"
    assert category_names(args)[5] == "ground" and panoptic_thing_ids(args) == [1, 2, 3]
    assert not (tmp_path / "absent").exists()


def test_generation_says_what_and_where_once(tmp_path, capsys):
    shapes.ensure_shapes(tmp_path / "said", train_size=2, val_size=1, image_size=32)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"shapes: generating 2 training and 1 validation images (32 px long side, seed 0) in "
                        f"{(tmp_path / 'said').resolve()} (once; later runs reuse it)")
    assert lines[1].startswith("shapes: done in ") and len(lines) == 2
    shapes.ensure_shapes(tmp_path / "said", train_size=2, val_size=1, image_size=32)
    assert capsys.readouterr().out == ""  # reused silently


def test_default_style_leaves_the_marker_and_files_of_the_plain_call(root, tmp_path):
    explicit = shapes.ensure_shapes(tmp_path / "explicit", train_size=40, val_size=4, image_size=48,
                                    **shapes.DEFAULT_STYLE)
    assert (explicit / "shapes.json").read_bytes() == (root / "shapes.json").read_bytes()
    assert json.loads((root / "shapes.json").read_text()).keys() == {
        "format_version", "train_size", "val_size", "image_size", "seed"}
    for name in ("annotations/instances_train2017.json", "train2017/000011.jpg", "panoptic_val2017/000002.png"):
        assert (explicit / name).read_bytes() == (root / name).read_bytes()


def test_variant_kinds_ids_counts_colours_and_boxes_only(tmp_path):
    style = dict(kinds=["star", "cross", "hexagon"], first_category_id=6, max_objects=8, radius=[0.06, 0.12],
                 colours="random", boxes_only=True)
    root = shapes.ensure_shapes(tmp_path / "v", train_size=30, val_size=2, image_size=96, **style)
    instances = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert [(c["id"], c["name"]) for c in instances["categories"]] == [(6, "star"), (7, "cross"), (8, "hexagon")]
    assert {a["category_id"] for a in instances["annotations"]} == {6, 7, 8}
    assert all("segmentation" not in a for a in instances["annotations"])
    counts = {}
    for ann in instances["annotations"]:
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
        image = next(i for i in instances["images"] if i["id"] == ann["image_id"])
        short = min(image["width"], image["height"])
        assert max(ann["bbox"][2:]) <= 2 * 0.12 * short + 2  # radius fraction of the short side
    assert max(counts.values()) > 5 and max(counts.values()) <= 8
    # random colours: the same class comes in very different colours
    pixels = np.asarray(Image.open(root / "train2017" / "000001.jpg"), dtype=np.int32)
    colours = []
    for ann in instances["annotations"]:
        if ann["image_id"] == 1:
            x, y, w, h = ann["bbox"]
            colours.append(pixels[int(y + h / 2), int(x + w / 2)])
    assert len(colours) >= 2
    assert json.loads((root / "shapes.json").read_text())["kinds"] == style["kinds"]
    with pytest.raises(ValueError, match="already holds"):  # another style is another generation
        shapes.ensure_shapes(tmp_path / "v", train_size=30, val_size=2, image_size=96)


def test_palette_draws_a_colour_per_class_from_the_seed(tmp_path):
    def make(name, colours, seed):
        root = shapes.ensure_shapes(tmp_path / name, train_size=12, val_size=3, image_size=96, seed=seed,
                                    kinds=["circle", "square"], colours=colours)
        return root, [json.loads((root / "annotations" / f"instances_{s}2017.json").read_text())
                      for s in ("train", "val")]

    root, (train, val) = make("p0", "palette", 0)
    palette = {c["name"]: c["color"] for c in train["categories"]}
    assert palette == {c["name"]: c["color"] for c in val["categories"]}  # both splits share it
    assert palette != {k: list(shapes.KIND_COLOURS[k]) for k in palette}
    assert {c["name"]: c["color"] for c in make("p1", "palette", 1)[1][0]["categories"]} != palette
    # the scene draws are those of the fixed colours: same objects and boxes, other colours
    _, (fixed, _) = make("c0", "class", 0)
    assert [(a["category_id"], a["bbox"]) for a in train["annotations"]] == \
        [(a["category_id"], a["bbox"]) for a in fixed["annotations"]]
    names = {c["id"]: c["name"] for c in train["categories"]}
    checked = 0
    for ann in train["annotations"]:
        x, y, w, h = ann["bbox"]
        if min(w, h) < 12:
            continue
        pixels = np.asarray(Image.open(root / "train2017" / f"{ann['image_id']:06d}.jpg"), dtype=np.int32)
        centre = pixels[int(y + h / 2), int(x + w / 2)]
        # jitter of +-25 per channel and JPEG noise; another object may lie on top
        checked += int(np.abs(centre - np.array(palette[names[ann["category_id"]]])).max() <= 45)
    assert checked >= len(train["annotations"]) // 2


@pytest.mark.parametrize("bad, message", [
    ({"kinds": ["blob"]}, "kinds"), ({"first_category_id": 3}, "stuff ids"), ({"max_objects": 0}, "max_objects"),
    ({"radius": [0.3, 0.2]}, "radius"), ({"colours": "grey"}, "colours"), ({"size": 3}, "unknown style field")])
def test_bad_style_fields_are_named(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        shapes.ensure_shapes(tmp_path / "bad", train_size=2, val_size=1, image_size=32, **bad)
    assert not (tmp_path / "bad").exists()
