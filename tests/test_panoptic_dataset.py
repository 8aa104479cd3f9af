"""COCO panoptic decoding: segment ids from RGB, per-segment masks, crowd, area, boxes, layout."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset, infer_num_classes
from datasets.coco_panoptic import id_to_rgb, rgb_to_id

# Segment ids chosen to use all three channels: 300 = (44, 1, 0), 70000 = (112, 17, 1).
THING, STUFF, CROWD = 300, 70000, 5


def _id_map():
    ids = np.full((6, 8), STUFF, dtype=np.int64)
    ids[0:2, 0:4] = THING
    ids[4:6, 6:8] = CROWD
    ids[5, 0] = 0  # VOID
    return ids


@pytest.fixture()
def panoptic_root(tmp_path, request):
    root = tmp_path
    (root / "val2017").mkdir()
    png_folder = root / getattr(request, "param", "") / "panoptic_val2017"
    png_folder.mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    Image.new("RGB", (8, 6), (1, 2, 3)).save(root / "val2017" / "000000000009.jpg")
    Image.fromarray(id_to_rgb(_id_map())).save(png_folder / "000000000009.png")
    segments = [{"id": THING, "category_id": 1, "iscrowd": 0, "area": 8, "bbox": [0, 0, 4, 2]},
                {"id": STUFF, "category_id": 184, "iscrowd": 0, "area": 35, "bbox": [0, 0, 8, 6]},
                {"id": CROWD, "category_id": 2, "iscrowd": 1, "area": 4, "bbox": [6, 4, 2, 2]}]
    data = {"images": [{"id": 9, "file_name": "000000000009.jpg", "width": 8, "height": 6}],
            "annotations": [{"image_id": 9, "file_name": "000000000009.png", "segments_info": segments}],
            "categories": [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "bicycle", "isthing": 1},
                           {"id": 184, "name": "tree", "isthing": 0}]}
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(data))
    return root


def _args(root):
    return argparse.Namespace(dataset_file="coco_panoptic", coco_path=str(root), coco_panoptic_path=str(root),
                              masks=True, image_scale=1.0, num_classes=None)


def test_rgb_id_round_trip():
    ids = _id_map()
    assert id_to_rgb(ids)[0, 0].tolist() == [44, 1, 0] and id_to_rgb(ids)[3, 3].tolist() == [112, 17, 1]
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)


@pytest.mark.parametrize("panoptic_root", ["", "annotations"], indirect=True)
def test_segments_decode_to_masks_labels_boxes_crowd_and_area(panoptic_root):
    dataset = build_dataset("val", _args(panoptic_root))
    dataset._transforms = None  # the raw target, before the recipe
    image, target = dataset[0]
    assert image.shape == (3, 6, 8)
    assert target["labels"].tolist() == [1, 184, 2]
    assert target["iscrowd"].tolist() == [0, 0, 1]
    assert target["area"].tolist() == [8, 35, 4]  # from the JSON
    masks = target["masks"]
    assert masks.shape == (3, 6, 8) and masks.dtype == torch.uint8
    assert masks.sum(dim=(1, 2)).tolist() == [8, 35, 4]
    assert masks[0, 0:2, 0:4].all() and masks[2, 4:6, 6:8].all() and masks[:, 5, 0].sum() == 0  # VOID: none
    # xyxy with the last pixel index as max (the original's masks_to_boxes)
    assert target["boxes"].tolist() == [[0, 0, 3, 1], [0, 0, 7, 5], [6, 4, 7, 5]]
    assert target["image_id"].tolist() == [9] and target["orig_size"].tolist() == [6, 8]
    assert dataset.ann_folder.name == "panoptic_val2017" and dataset.ann_file.name == "panoptic_val2017.json"
    assert dataset.thing_ids == [1, 2]
    assert sorted(dataset.coco.getCatIds()) == [1, 2, 184] and len(dataset.coco.anns) == 3


def test_recipe_keeps_masks_and_boxes_aligned(panoptic_root):
    image, target = build_dataset("val", _args(panoptic_root))[0]
    assert target["masks"].shape[-2:] == image.shape[-2:] == (800, 1066)
    assert torch.allclose(target["boxes"][0], torch.tensor([1.5, 0.5, 3, 1]) / torch.tensor([8, 6, 8, 6]))


def test_num_classes_and_bad_category(panoptic_root):
    args = _args(panoptic_root)
    assert infer_num_classes(args) == 250
    args.num_classes = 100
    with pytest.raises(ValueError, match=r"segment id 70000 .* category id 184.*--num_classes 185"):
        build_dataset("val", args)


def test_missing_panoptic_path_names_the_flag():
    with pytest.raises(ValueError, match="--coco_panoptic_path"):
        build_dataset("val", argparse.Namespace(dataset_file="coco_panoptic", coco_path="x", coco_panoptic_path=None))


def _rewrite(root, change):
    ann_file = root / "annotations" / "panoptic_val2017.json"
    data = json.loads(ann_file.read_text())
    change(data)
    ann_file.write_text(json.dumps(data))


def _segments(data):
    return data["annotations"][0]["segments_info"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"].append(dict(d["annotations"][0], file_name="other.png")),
     "annotation 1 (image_id 9, other.png): another annotation has the same image_id or PNG"),
    (lambda d: _segments(d)[1].update(category_id=7), "segment id 70000 has category_id 7, which is not an id"),
    (lambda d: _segments(d)[1].update(id=THING), "segment id 300 is not an integer used once in the PNG"),
    (lambda d: _segments(d)[1].update(area="35"), "segment id 70000 has area '35'"),
    (lambda d: d["annotations"][0].pop("segments_info"), "needs an integer 'image_id', the PNG's 'file_name' and a "
                                                          "'segments_info' list"),
    (lambda d: d["categories"].append({"id": 1, "name": "again"}), "category id 1 in 'categories' is not an integer listed once"),
])
def test_entries_that_would_pair_wrong_segments_are_refused(panoptic_root, change, message):
    _rewrite(panoptic_root, change)
    with pytest.raises(ValueError) as err:
        build_dataset("val", _args(panoptic_root))
    assert "panoptic_val2017.json" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("missing, message", [
    ("panoptic_val2017/000000000009.png", "lists 1 PNG file(s) of 1 that are not in"),
    ("val2017/000000000009.jpg", "lists 1 image file(s) of 1 that are not in"),
])
def test_missing_png_or_picture_is_found_before_training(panoptic_root, missing, message):
    (panoptic_root / missing).unlink()
    with pytest.raises(ValueError) as err:
        build_dataset("val", _args(panoptic_root))
    assert "panoptic_val2017.json" in str(err.value) and message in str(err.value)
    assert "(000000000009." in str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(annotations=[]), "the val split has no annotations"),
    (lambda d: _segments(d).clear(), "the val split has 1 image(s) but no segments"),
])
def test_split_without_segments_is_refused(panoptic_root, change, message):
    _rewrite(panoptic_root, change)
    with pytest.raises(ValueError) as err:
        build_dataset("val", _args(panoptic_root))
    assert "panoptic_val2017.json: " + message in str(err.value)


def test_panoptic_file_not_utf8_names_the_line(panoptic_root):
    ann_file = panoptic_root / "annotations" / "panoptic_val2017.json"
    ann_file.write_bytes(ann_file.read_bytes().replace(b'"tree"', b'\n"tr\xe9e"'))
    with pytest.raises(ValueError, match=r"panoptic_val2017\.json: line 2 is not UTF-8 text \(byte 0xe9"):
        build_dataset("val", _args(panoptic_root))
