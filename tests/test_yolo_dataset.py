"""--dataset_file yolo: a YOLO txt export gives the targets, COCO ground truth and COCO AP of the
same data in COCO format (--dataset_file custom); bad label lines are named by file and line.

The generated shapes data is exported twice, box-only: as a COCO-format set (category ids 0..2,
area = box area) and as a YOLO layout (class 0..2, centre and size as fractions, written with
full float precision).
"""
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from datasets import yolo
from datasets.coco_eval import CocoEvaluator
from datasets.shapes import ensure_shapes
from util.checkpoint import load_checkpoint

NAMES = ["circle", "square", "triangle"]
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "8", "--image_scale", "0.16",
        "--device", "cpu", "--batch_size", "2", "--print_freq", "100", "--num_workers", "0", "--epochs", "1",
        "--augment", "none"]


def _export(shapes: Path, root: Path) -> None:
    """shapes -> root/coco/{train,val}.json + images, and root/yolo/{images,labels}/{train,val} + data.yaml."""
    for split in ("train", "val"):
        source = json.loads((shapes / "annotations" / f"instances_{split}2017.json").read_text())
        images = {im["id"]: im for im in source["images"]}
        coco = {"images": source["images"],
                "categories": [{"id": k, "name": n} for k, n in enumerate(NAMES)],
                "annotations": [{"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"] - 1,
                                 "bbox": a["bbox"], "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0}
                                for a in source["annotations"]]}
        (root / "coco").mkdir(parents=True, exist_ok=True)
        (root / "coco" / f"{split}.json").write_text(json.dumps(coco))
        shutil.copytree(shapes / f"{split}2017", root / "coco" / split)
        shutil.copytree(shapes / f"{split}2017", root / "yolo" / "images" / split)
        labels = root / "yolo" / "labels" / split
        labels.mkdir(parents=True)
        lines: dict[str, list[str]] = {im["file_name"]: [] for im in source["images"]}
        for a in coco["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            values = [(x + w / 2) / im["width"], (y + h / 2) / im["height"], w / im["width"], h / im["height"]]
            lines[im["file_name"]].append(" ".join([str(a["category_id"])] + [repr(v) for v in values]))
        for file_name, rows in lines.items():
            if rows:  # an image without objects gets no label file, as YOLO tools write it
                (labels / file_name).with_suffix(".txt").write_text("\n".join(rows) + "\n")
    (root / "yolo" / "data.yaml").write_text(
        "# exported for the test\npath: .\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {k}: {n}\n" for k, n in enumerate(NAMES)))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("yolo")
    shapes = ensure_shapes(root / "shapes", train_size=4, val_size=3, image_size=64)
    _export(shapes, root)
    return root


def _flags(kind: str, root: Path) -> list[str]:
    if kind == "yolo":
        return ["--dataset_file", "yolo", "--data_path", str(root / "yolo")]
    coco = root / "coco"
    return ["--dataset_file", "custom", "--train_images", str(coco / "train"), "--train_annotations",
            str(coco / "train.json"), "--val_images", str(coco / "val"), "--val_annotations", str(coco / "val.json")]


def _datasets(kind: str, root: Path, split: str):
    import datasets

    args = main.get_args_parser().parse_args([*TINY, *_flags(kind, root)])
    return datasets.build_dataset(split, args)


@pytest.mark.parametrize("split", ["train", "val"])
def test_same_targets_and_ground_truth_as_the_coco_export(exports, split):
    from_yolo, from_coco = _datasets("yolo", exports, split), _datasets("custom", exports, split)
    assert from_yolo.coco.dataset["categories"] == from_coco.coco.dataset["categories"]
    assert from_yolo.coco.dataset["images"] == from_coco.coco.dataset["images"]
    a, b = from_yolo.coco.dataset["annotations"], from_coco.coco.dataset["annotations"]
    assert [(x["image_id"], x["category_id"]) for x in a] == [(x["image_id"], x["category_id"]) for x in b]
    np.testing.assert_allclose([x["bbox"] for x in a], [x["bbox"] for x in b], rtol=0, atol=1e-9)
    for i in range(len(from_coco)):
        (image_y, target_y), (image_c, target_c) = from_yolo[i], from_coco[i]
        assert torch.equal(image_y, image_c)
        assert target_y.keys() == target_c.keys()
        for key in target_c:  # float32 boxes: the 1e-14 px of the text round trip vanish
            torch.testing.assert_close(target_y[key], target_c[key], rtol=0, atol=1e-6)


def test_same_coco_ap_for_the_same_detections(exports):
    """Detections near (and away from) the boxes: every COCO number is the same on both ground truths."""
    gt_yolo, gt_coco = _datasets("yolo", exports, "val").coco, _datasets("custom", exports, "val").coco
    g = torch.Generator().manual_seed(3)
    predictions = {}
    for image_id in gt_coco.getImgIds():
        boxes = torch.tensor([a["bbox"] for a in gt_coco.imgToAnns[image_id]], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes = torch.cat([boxes + 3 * torch.randn(boxes.shape, generator=g), torch.tensor([[2.0, 2.0, 20.0, 20.0]])])
        predictions[image_id] = {"boxes": boxes, "scores": torch.rand(len(boxes), generator=g),
                                 "labels": torch.randint(0, 3, (len(boxes),), generator=g)}
    stats = []
    for gt in (gt_yolo, gt_coco):
        evaluator = CocoEvaluator(gt, ["bbox"])
        evaluator.update(predictions)
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.summarize()
        stats.append(evaluator.coco_eval["bbox"].stats.tolist())
    assert 0 < stats[1][0] < 1  # a non-trivial AP
    assert stats[0] == stats[1]


def test_trains_and_evaluates_like_the_coco_export(exports, tmp_path):
    logs = {}
    for kind in ("yolo", "custom"):
        out = tmp_path / kind
        main.main(main.get_args_parser().parse_args([*TINY, *_flags(kind, exports), "--output_dir", str(out)]))
        logs[kind] = json.loads((out / "log.txt").read_text())
    assert len(logs["yolo"]["test_coco_eval_bbox"]) == 12
    assert logs["yolo"]["test_coco_eval_bbox"] == logs["custom"]["test_coco_eval_bbox"]
    for key, value in logs["custom"].items():
        if key.startswith(("train_loss", "test_loss")):
            assert logs["yolo"][key] == pytest.approx(value, rel=1e-5), key
    names = load_checkpoint(tmp_path / "yolo" / "checkpoint.pth")["category_names"]
    assert names == dict(enumerate(NAMES))


# ---------------------------------------------------------------------------------------------
# Bad labels and the names file


def _tiny_yolo(root: Path, label: str, names: str = "names: [a, b]\n") -> Path:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        from PIL import Image
        Image.new("RGB", (40, 30)).save(root / "images" / split / "x.png")
        (root / "labels" / split / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n" + label)
    (root / "data.yaml").write_text(names)
    return root


@pytest.mark.parametrize("label, message", [
    ("1 0.5 0.5 0.2\n", "4 fields, expected 5"),
    ("2 0.5 0.5 0.2 0.2\n", "class index 2 is outside the 2 names"),
    ("1 0.5 1.5 0.2 0.2\n", "1.5 is outside [0, 1]"),
    ("1 0.5 0.5 -0.1 0.2\n", "-0.1 is outside [0, 1]"),
    ("x 0.5 0.5 0.2 0.2\n", "cannot read 'x 0.5 0.5 0.2 0.2'"),
])
def test_bad_label_line_is_named_by_file_and_line(tmp_path, label, message):
    root = _tiny_yolo(tmp_path / "data", label)
    with pytest.raises(ValueError) as err:
        yolo.yolo_to_coco(*yolo.split_folders(root, "train"), yolo.class_names(root))
    assert f"{root / 'labels' / 'train' / 'x.txt'}, line 2: {message}" in str(err.value)


def test_boxes_in_pixels_and_an_image_without_labels(tmp_path):
    root = _tiny_yolo(tmp_path / "data", "1 0.25 0.5 0.5 1.0\n")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(root / "images" / "train" / "empty.png")
    coco = yolo.yolo_to_coco(*yolo.split_folders(root, "train"), yolo.class_names(root))
    assert [im["file_name"] for im in coco.dataset["images"]] == ["empty.png", "x.png"]
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in coco.dataset["annotations"]] == [
        (2, 0, [16.0, 12.0, 8.0, 6.0]), (2, 1, [0.0, 0.0, 20.0, 30.0])]


def test_roboflow_layout_with_parent_relative_paths(tmp_path):
    """ROOT/train/images + ROOT/valid/images, data.yaml 'train: ../train/images' (Roboflow's export)."""
    root = tmp_path / "data"
    from PIL import Image
    for split in ("train", "valid"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        Image.new("RGB", (10, 10)).save(root / split / "images" / f"{split}.jpg")
        (root / split / "labels" / f"{split}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['thing']\n")
    assert yolo.split_folders(root, "val") == (root / "valid" / "images", root / "valid" / "labels")
    coco = yolo.yolo_to_coco(*yolo.split_folders(root, "train"), yolo.class_names(root))
    assert [a["bbox"] for a in coco.dataset["annotations"]] == [[4.0, 4.0, 2.0, 2.0]]
    (root / "data.yaml").write_text("train: train.txt\nnames: [thing]\n")
    with pytest.raises(ValueError, match="train.txt is a list of image files"):
        yolo.split_folders(root, "train")


@pytest.mark.parametrize("text", [
    "names: [a, 'b c']\n",
    "nc: 2\nnames: {0: a, 1: \"b c\"}\n",
    "names:\n  - a   # first\n  - 'b c'\nnc: 2\n",
    "names:\n  0: a\n  1: b c\ntrain: images/train\n",
    "names:\n- a\n- b c\n",
])
def test_data_yaml_forms(tmp_path, text):
    (tmp_path / "data.yaml").write_text(text)
    assert yolo.class_names(tmp_path) == ["a", "b c"]


def test_data_yaml_names_with_a_non_numeric_key_are_named(tmp_path):
    (tmp_path / "data.yaml").write_text("names:\n  zero: a\n")
    with pytest.raises(ValueError, match="names: 'zero' is not a class index"):
        yolo.class_names(tmp_path)


def test_classes_txt_and_missing_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data.yaml or classes.txt"):
        yolo.class_names(tmp_path)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert yolo.class_names(tmp_path) == ["cat", "dog"]


# ---------------------------------------------------------------------------------------------
# Labels that do not pair with their images, names that disagree, text that is not UTF-8


def _convert(root: Path, split: str = "train"):
    return yolo.yolo_to_coco(*yolo.split_folders(root, split), yolo.class_names(root))


def test_missing_labels_folder_is_refused_naming_what_is_there(tmp_path):
    root = _tiny_yolo(tmp_path / "data", "")
    (root / "labels").rename(root / "Labels")
    with pytest.raises(FileNotFoundError) as err:
        _convert(root)
    message = str(err.value)
    assert f"labels folder not found: {root / 'labels' / 'train'}" in message
    assert f"{root} holds: Labels, data.yaml, images" in message


def test_label_files_named_after_no_image_are_refused(tmp_path):
    root = _tiny_yolo(tmp_path / "data", "")
    (root / "labels" / "train" / "x.txt").rename(root / "labels" / "train" / "x.jpg.txt")
    with pytest.raises(ValueError, match=r"none of the 1 images in .* has a label file in .*looked for e\.g\. x\.txt; "
                                         r"the folder holds 1 other \.txt files, e\.g\. x\.jpg\.txt"):
        _convert(root)


def test_two_images_sharing_one_label_file_are_refused(tmp_path):
    root = _tiny_yolo(tmp_path / "data", "")
    from PIL import Image
    Image.new("RGB", (40, 30)).save(root / "images" / "train" / "x.jpg")
    with pytest.raises(ValueError) as err:
        _convert(root)
    assert "x.jpg and" in str(err.value) and "x.png share the label file" in str(err.value)
    assert str(root / "labels" / "train" / "x.txt") in str(err.value)


def test_unlabelled_images_and_imageless_labels_are_noted_with_counts(tmp_path, caplog):
    import logging
    from PIL import Image

    root = _tiny_yolo(tmp_path / "data", "")
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(root / "images" / "train" / name)
    (root / "labels" / "train" / "gone.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with caplog.at_level(logging.WARNING, logger="datasets.yolo"):
        coco = _convert(root)
    assert len(coco.dataset["images"]) == 3 and len(coco.dataset["annotations"]) == 1
    assert "2 of 3 images have no label file in" in caplog.text and "(first: a.png)" in caplog.text
    assert "1 label file(s) have no image in" in caplog.text and "(first: gone.txt)" in caplog.text


@pytest.mark.parametrize("name, data, message", [
    ("labels/train/x.txt", b"0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2 # caf\xe9\n",
     "labels/train/x.txt: line 2 is not UTF-8 text (byte 0xe9 at offset 41)"),
    ("data.yaml", b"nc: 2\nnames: [a, caf\xe9]\n", "data.yaml: line 2 is not UTF-8 text (byte 0xe9"),
])
def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path, name, data, message):
    root = _tiny_yolo(tmp_path / "data", "")
    (root / name).write_bytes(data)
    with pytest.raises(ValueError) as err:
        _convert(root)
    assert str(root / message.split(":")[0]) in str(err.value) and message in str(err.value)


def test_byte_order_marks_are_read(tmp_path):
    root = _tiny_yolo(tmp_path / "data", "")
    (root / "data.yaml").write_bytes(b"\xef\xbb\xbfnames: [a, b]\n")
    (root / "labels" / "train" / "x.txt").write_bytes(b"\xef\xbb\xbf1 0.5 0.5 0.2 0.2\n")
    coco = _convert(root)
    assert [a["category_id"] for a in coco.dataset["annotations"]] == [1]
    (tmp_path / "classes.txt").write_bytes(b"\xef\xbb\xbfcat\ndog\n")
    assert yolo.class_names(tmp_path) == ["cat", "dog"]


@pytest.mark.parametrize("text, message", [
    ("nc: 3\nnames: [a, b]\n", "data.yaml: nc: 3 but names lists 2 (a, b); make them agree"),
    ("nc: three\n", "data.yaml: nc: 'three' is not a number of classes"),
])
def test_data_yaml_nc_that_disagrees_is_refused(tmp_path, text, message):
    (tmp_path / "data.yaml").write_text(text)
    with pytest.raises(ValueError) as err:
        yolo.class_names(tmp_path)
    assert message in str(err.value)


def test_classes_txt_other_than_data_yaml_is_noted(tmp_path, caplog):
    import argparse
    import logging

    from datasets import build_dataset

    root = _tiny_yolo(tmp_path / "data", "")
    (root / "classes.txt").write_text("cat\ndog\n")
    args = argparse.Namespace(dataset_file="yolo", data_path=str(root), num_classes=None, masks=False, image_scale=0.1)
    with caplog.at_level(logging.WARNING, logger="datasets.yolo"):
        dataset = build_dataset("train", args)
    assert "classes.txt lists other class names (cat, dog) than data.yaml (a, b): data.yaml's are used" in caplog.text
    assert dataset.category_names == {0: "a", 1: "b"}
