"""--dataset_file custom: COCO-format exports with category ids from 0 or 1 and gaps."""
import argparse
import json
import random

import pytest
import torch
from PIL import Image

from datasets import build_dataset, category_names, infer_num_classes


def _export(root, category_ids, names):
    """Two splits of 3 images, each image holding one box of each category in turn."""
    args = {}
    for split in ("train", "val"):
        folder = root / split
        folder.mkdir()
        images, anns = [], []
        for i in range(3):
            Image.new("RGB", (60, 40), (40 * i, 90, 160)).save(folder / f"{i}.jpg")
            images.append({"id": 100 + i, "file_name": f"{i}.jpg", "width": 60, "height": 40})
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": category_ids[i % len(category_ids)],
                         "bbox": [5 + i, 5, 20, 15], "area": 300, "iscrowd": 0})
        ann_file = root / f"{split}.json"
        ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                        "categories": [{"id": c, "name": n} for c, n in zip(category_ids, names)]}))
        args[f"{split}_images"], args[f"{split}_annotations"] = str(folder), str(ann_file)
    return argparse.Namespace(dataset_file="custom", num_classes=None, masks=False, image_scale=0.1, **args)


@pytest.mark.parametrize("category_ids,names,expected", [
    ([0, 3, 7], ["cat", "dog", "fox"], 8),
    ([1, 4, 9], ["apple", "pear", "plum"], 10),
])
def test_num_classes_names_and_labels_follow_the_export(tmp_path, category_ids, names, expected):
    args = _export(tmp_path, category_ids, names)
    assert infer_num_classes(args) == expected
    assert category_names(args) == dict(zip(category_ids, names))
    for split in ("train", "val"):
        dataset = build_dataset(split, args)
        labels = [dataset[i][1]["labels"].tolist() for i in range(len(dataset))]
        assert labels == [[c] for c in category_ids]
        assert dataset.category_names == dict(zip(category_ids, names))
    # the train recipe's random crop may cut the only box away, so seed both of its RNGs
    random.seed(0)
    torch.manual_seed(0)
    image, target = build_dataset("train", args)[0]
    assert image.dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert len(target["boxes"]) == len(target["labels"]) <= 1


def test_given_num_classes_is_kept_or_refused_naming_the_largest_id(tmp_path):
    args = _export(tmp_path, [0, 3, 7], ["cat", "dog", "fox"])
    args.num_classes = 20
    assert infer_num_classes(args) == 20
    args.num_classes = 5
    with pytest.raises(ValueError, match=r"--num_classes 5 is too small.*category id 7.*--num_classes 8"):
        infer_num_classes(args)
    with pytest.raises(ValueError, match=r"category id 7.*num_classes=5"):
        build_dataset("train", args)


def test_missing_flags_name_the_flag():
    args = argparse.Namespace(dataset_file="custom", train_images=None, train_annotations=None, val_images=None,
                              val_annotations=None, num_classes=None)
    with pytest.raises(ValueError, match="--train_images DIR and --train_annotations FILE"):
        build_dataset("train", args)
    with pytest.raises(ValueError, match="--train_annotations"):
        infer_num_classes(args)
