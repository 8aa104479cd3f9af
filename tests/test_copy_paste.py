"""--copy_paste N: objects cut along their polygons from another training image (training only)."""
import argparse
import json

import pytest
import torch
from PIL import Image

from datasets import build_dataset
from datasets.copy_paste import paste_objects
from datasets.shapes import ensure_shapes


def _target(boxes, masks=None):
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.ones(len(boxes), dtype=torch.int64),
         "area": torch.full((len(boxes),), 100.0), "iscrowd": torch.zeros(len(boxes), dtype=torch.int64)}
    if masks is not None:
        t["masks"] = masks
    return t


def test_pasted_object_keeps_its_shape_box_and_label_and_only_its_pixels_change():
    image = torch.zeros((3, 40, 50), dtype=torch.uint8)
    target = _target([[0.0, 0.0, 10.0, 10.0]])
    source = torch.full((3, 30, 30), 200, dtype=torch.uint8)
    mask = torch.zeros((30, 30), dtype=torch.bool)
    mask[5:11, 12:20] = True  # 6 x 8 object
    mask[5, 12] = False  # not a full rectangle: only mask pixels may move
    out, new = paste_objects(image, target, source, [(mask, 3)], generator=torch.Generator().manual_seed(0))
    assert image.eq(0).all() and target["boxes"].shape == (1, 4)  # inputs untouched
    assert new["labels"].tolist() == [1, 3]
    x0, y0, x1, y1 = new["boxes"][1].tolist()
    assert (x1 - x0, y1 - y0) == (8, 6)
    assert 0 <= x0 and x1 <= 50 and 0 <= y0 and y1 <= 40
    assert new["area"][1].item() == 47 and new["iscrowd"].tolist() == [0, 0]
    changed = out.ne(0).any(0)
    assert changed.sum().item() == 47
    assert changed[int(y0):int(y1), int(x0):int(x1)].sum().item() == 47  # all inside the new box
    ix = max(0.0, min(x1, 10) - max(x0, 0)) * max(0.0, min(y1, 10) - max(y0, 0))
    assert ix / (48 + 100 - ix) < 0.1  # away from the object already there


def test_masks_follow_the_paste_and_too_large_objects_are_skipped():
    masks = torch.zeros((1, 20, 20), dtype=torch.uint8)
    masks[0, :, :] = 1  # an object under everything: the pasted one cuts its mask
    target = _target([[0.0, 0.0, 2.0, 2.0]], masks)
    source = torch.full((3, 20, 20), 9, dtype=torch.uint8)
    small = torch.zeros((20, 20), dtype=torch.bool)
    small[0:4, 0:5] = True
    huge = torch.ones((20, 20), dtype=torch.bool)  # as large as the image: no place for it
    out, new = paste_objects(torch.zeros((3, 20, 20), dtype=torch.uint8), target, source,
                             [(huge, 2), (small, 2)], generator=torch.Generator().manual_seed(1))
    assert new["labels"].tolist() == [1, 2] and new["masks"].shape == (2, 20, 20)
    assert new["masks"].dtype == torch.uint8
    assert new["masks"][1].sum().item() == 20
    assert (new["masks"][0].bool() & new["masks"][1].bool()).sum().item() == 0
    assert new["masks"][0].sum().item() == 400 - 20
    assert out.eq(9).all(0).sum().item() == 20


def _shapes_args(root, paste):
    return argparse.Namespace(dataset_file="shapes", data_path=str(root), shapes_train_size=8, shapes_val_size=4,
                              shapes_image_size=64, masks=False, image_scale=0.08, augment="none",
                              copy_paste=paste, num_classes=None)


def test_copy_paste_adds_objects_to_training_images_only(tmp_path):
    ensure_shapes(tmp_path / "shapes", train_size=8, val_size=4, image_size=64)
    plain = build_dataset("train", _shapes_args(tmp_path / "shapes", 0))
    pasted = build_dataset("train", _shapes_args(tmp_path / "shapes", 2))
    val = build_dataset("val", _shapes_args(tmp_path / "shapes", 2))
    assert plain.copy_paste == 0 and pasted.copy_paste == 2 and val.copy_paste == 0
    state = torch.get_rng_state()
    plain_items = [plain[i] for i in range(8)]
    assert torch.equal(torch.get_rng_state(), state)  # off: no random numbers drawn, items as before
    torch.manual_seed(0)
    first = [pasted[i] for i in range(8)]
    torch.manual_seed(0)
    again = [pasted[i] for i in range(8)]
    extra = 0
    for (image, target), (image_p, target_p), (image_a, target_a) in zip(plain_items, first, again):
        assert torch.equal(image_p, image_a) and torch.equal(target_p["boxes"], target_a["boxes"])
        n, m = len(target["labels"]), len(target_p["labels"])
        assert n <= m <= n + 2
        assert torch.equal(target_p["labels"][:n], target["labels"])
        boxes = target_p["boxes"]  # normalised cxcywh after the transforms
        assert (boxes[:, 2:] > 0).all() and (boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6).all()
        assert (boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6).all()
        extra += m - n
    assert extra > 0


def test_boxes_only_annotations_are_refused_naming_the_file(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    Image.new("RGB", (40, 30)).save(folder / "a.jpg")
    ann_file = tmp_path / "train.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "box"}]}))
    args = argparse.Namespace(dataset_file="custom", train_images=str(folder), train_annotations=str(ann_file),
                              val_images=str(folder), val_annotations=str(ann_file), num_classes=None,
                              masks=False, image_scale=0.1, copy_paste=1)
    with pytest.raises(ValueError, match=r"train\.json has no 'segmentation'.*--copy_paste 0"):
        build_dataset("train", args)
    assert build_dataset("val", args).copy_paste == 0
