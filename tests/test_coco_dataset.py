"""COCO detection dataset: polygons and RLE to masks, crowd dropped, xyxy boxes, the --coco_path layout."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from datasets import build_dataset, get_coco_api_from_dataset, infer_num_classes
from datasets.coco import CocoDetection


def _rle(mask):
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """train2017/ with two images (60x80 and 50x40), one without annotations, and the instances JSON."""
    root = tmp_path_factory.mktemp("coco")
    (root / "train2017").mkdir()
    (root / "annotations").mkdir()
    Image.new("RGB", (80, 60), (10, 20, 30)).save(root / "train2017" / "a.jpg")
    Image.new("RGB", (40, 50), (200, 100, 0)).save(root / "train2017" / "b.png")
    square = np.zeros((60, 80), np.uint8)
    square[30:40, 50:70] = 1
    anns = [
        # polygon: the rectangle x 10..30, y 5..25
        {"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 5, 20, 20], "area": 400, "iscrowd": 0,
         "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]},
        # compressed RLE
        {"id": 2, "image_id": 7, "category_id": 90, "bbox": [50, 30, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": _rle(square)},
        # crowd: dropped
        {"id": 3, "image_id": 7, "category_id": 1, "bbox": [0, 0, 80, 60], "area": 4800, "iscrowd": 1,
         "segmentation": {"size": [60, 80], "counts": [0, 4800]}},
        # uncompressed RLE, box running past the right edge: clamped to x = 80
        {"id": 4, "image_id": 7, "category_id": 5, "bbox": [70, 0, 30, 10], "area": 100, "iscrowd": 0,
         "segmentation": {"size": [60, 80], "counts": [4200, 10, 50, 10, 530]}},
    ]
    data = {"images": [{"id": 7, "file_name": "a.jpg", "width": 80, "height": 60},
                       {"id": 3, "file_name": "b.png", "width": 40, "height": 50}],
            "annotations": anns, "categories": [{"id": i, "name": f"c{i}"} for i in (1, 5, 18, 90)]}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    return root


def _dataset(root, masks=True):
    return CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json", None,
                         return_masks=masks, num_classes=91)


def test_target_fields_boxes_labels_and_sizes(coco_root):
    dataset = _dataset(coco_root)
    assert dataset.ids == [3, 7] and len(dataset) == 2
    image, target = dataset[1]
    assert image.shape == (3, 60, 80) and image.dtype == torch.uint8
    assert target["labels"].tolist() == [18, 90, 5]  # crowd annotation 3 dropped
    assert target["boxes"].tolist() == [[10, 5, 30, 25], [50, 30, 70, 40], [70, 0, 80, 10]]
    assert target["boxes"].dtype == torch.float32
    assert target["area"].tolist() == [400, 200, 100] and target["iscrowd"].tolist() == [0, 0, 0]
    assert target["image_id"].tolist() == [7]
    assert target["orig_size"].tolist() == [60, 80] and target["size"].tolist() == [60, 80]


def test_polygon_and_rle_masks(coco_root):
    _, target = _dataset(coco_root)[1]
    masks = target["masks"]
    assert masks.shape == (3, 60, 80) and masks.dtype == torch.uint8
    # pycocotools fills the polygon with corners x 10..30, y 5..25 as pixels 10..29 x 5..24
    ys, xs = torch.nonzero(masks[0], as_tuple=True)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 29, 5, 24) and masks[0].sum() == 400
    assert masks[1].sum() == 200 and masks[1, 30:40, 50:70].all()
    # uncompressed RLE (column-major): 4200 zeros = columns 0..69, then 10 ones in column 70
    assert masks[2].sum() == 20 and masks[2, 0:10, 70].all() and masks[2, 0:10, 71].all()


@pytest.mark.parametrize("segmentation, message", [
    # run lengths short of 60*80: pycocotools would leave the rest of the mask uninitialised
    ({"size": [60, 80], "counts": [4200, 10, 50, 10]}, "counts cover 4270 pixels, but its size 60x80 has 4800"),
    ({"size": [60, 80], "counts": [4200, 10, 50, 10, 600]}, "counts cover 4870 pixels"),
    ({"size": [80, 60], "counts": [0, 4800]}, "RLE segmentation has size [80, 60], but the image is [60, 80]"),
])
def test_malformed_rle_names_the_annotation_and_the_fix(tmp_path, segmentation, message):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (80, 60)).save(tmp_path / "train2017" / "a.jpg")
    ann_file = tmp_path / "annotations" / "instances_train2017.json"
    ann_file.write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg", "width": 80, "height": 60}],
        "annotations": [{"id": 12, "image_id": 7, "category_id": 5, "bbox": [70, 0, 10, 10],
                         "area": 100, "iscrowd": 0, "segmentation": segmentation}],
        "categories": [{"id": 5, "name": "c5"}]}))
    with pytest.raises(ValueError) as error:
        _dataset(tmp_path)[0]
    text = str(error.value)
    assert message in text and "annotation id 12" in text
    assert str(ann_file) in text and "a.jpg" in text
    _dataset(tmp_path, masks=False)[0]  # boxes alone do not read the segmentation


def test_image_without_annotations_gives_empty_target(coco_root):
    image, target = _dataset(coco_root)[0]
    assert image.shape == (3, 50, 40)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 50, 40)


def test_build_reads_the_original_layout_and_applies_the_recipe(coco_root):
    args = argparse.Namespace(dataset_file="coco", coco_path=str(coco_root), masks=False, image_scale=0.1,
                              num_classes=None)
    dataset = build_dataset("train", args)
    image, target = dataset[1]
    assert image.dtype == torch.float32 and target["size"].tolist() == list(image.shape[-2:])
    assert max(image.shape[-2:]) <= 134 and "masks" not in target
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    assert get_coco_api_from_dataset(torch.utils.data.Subset(dataset, [0])) is dataset.coco
    assert infer_num_classes(args) == 91
    with pytest.raises(FileNotFoundError, match="val2017"):
        build_dataset("val", args)


def test_missing_coco_path_is_a_clear_error():
    with pytest.raises(ValueError, match="--coco_path"):
        build_dataset("train", argparse.Namespace(dataset_file="coco", coco_path=None))
    with pytest.raises(ValueError, match="--dataset_file"):
        build_dataset("train", argparse.Namespace(dataset_file="voc"))
