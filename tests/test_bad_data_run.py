"""Bad data files through the real command: main.py refuses before the model is built, with exit
status 2 and one line `error: ...` naming the file, the entry and the fix; --output_dir keeps every
file byte for byte. One case per class of fault (the other members of each class are checked at
unit level in test_bad_data.py, test_yolo_dataset.py and test_panoptic_dataset.py).
"""
import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "8", "--image_scale", "0.16",
        "--device", "cpu", "--batch_size", "2", "--num_workers", "0", "--epochs", "1", "--augment", "none"]


def _coco_split(folder: Path, ann_file: Path, change: Callable[[dict], None] = lambda data: None) -> None:
    """3 pictures of 60x40 with one box each, `change` applied to the JSON before it is written."""
    folder.mkdir(parents=True)
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "disc"}]}
    for i in range(3):
        Image.new("RGB", (60, 40), (60 * i, 90, 160)).save(folder / f"{i}.jpg")
        data["images"].append({"id": i + 1, "file_name": f"{i}.jpg", "width": 60, "height": 40})
        data["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2,
                                    "bbox": [5, 5, 20, 15], "area": 300, "iscrowd": 0})
    change(data)
    ann_file.write_text(json.dumps(data))


def _custom(root: Path, train: Callable[[dict], None] = lambda d: None,
            val: Callable[[dict], None] = lambda d: None) -> list[str]:
    _coco_split(root / "train", root / "train.json", train)
    _coco_split(root / "val", root / "val.json", val)
    return ["--dataset_file", "custom", "--train_images", str(root / "train"), "--train_annotations",
            str(root / "train.json"), "--val_images", str(root / "val"), "--val_annotations", str(root / "val.json")]


def _yolo(root: Path) -> list[str]:
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30)).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text("names: [box, disc]\n")
    return ["--dataset_file", "yolo", "--data_path", str(root)]


def _yolo_without_labels(root: Path) -> list[str]:
    flags = _yolo(root)
    (root / "labels").rename(root / "label")  # a misnamed folder: every image would look unlabelled
    return flags


def _yolo_latin1_label(root: Path) -> list[str]:
    flags = _yolo(root)
    (root / "labels" / "train" / "1.txt").write_bytes(b"0 0.5 0.5 0.25 0.5\n1 0.5 0.5 0.25 0.5 # caf\xe9\n")
    return flags


def _picture_resized(root: Path) -> list[str]:
    flags = _custom(root)
    Image.new("RGB", (30, 20)).save(root / "train" / "2.jpg")  # shrunk after labelling
    return flags


def _picture_missing(root: Path) -> list[str]:
    flags = _custom(root)
    (root / "train" / "1.jpg").unlink()
    return flags


def _no_val_boxes(data: dict) -> None:
    data["annotations"] = []


def _crowd_only(data: dict) -> None:
    for ann in data["annotations"]:
        ann["iscrowd"] = 1


# case -> (data writer returning the flags, parts the one-line message must hold)
CASES = {
    "two_images_share_an_id": (
        lambda root: _custom(root, train=lambda d: d["images"][1].update(id=1)),
        ["train.json", "'images' id 1 is used twice", "'0.jpg' and '1.jpg'", "renumber"]),
    "picture_listed_twice": (
        lambda root: _custom(root, train=lambda d: d["images"][2].update(file_name="0.jpg")),
        ["train.json", "file_name 0.jpg is listed 2 times", "image ids 1, 3", "keep one entry"]),
    "nan_in_a_val_box": (
        lambda root: _custom(root, val=lambda d: d["annotations"][1].update(bbox=[5, float("nan"), 20, 15])),
        ["val.json", "annotation id 2 has bbox [5, nan, 20, 15]", "4 finite numbers"]),
    "picture_missing": (
        _picture_missing,
        ["train.json lists 1 image file(s) of 3 that are not in", "(1.jpg)", "add the files"]),
    "picture_resized_after_labelling": (
        _picture_resized,
        ["train.json", "1 of 3 picture(s)", "2.jpg is 30x20 but the annotation file says 60x40",
         "correct width/height"]),
    "val_without_images": (
        lambda root: _custom(root, val=lambda d: d.update(images=[], annotations=[])),
        ["val.json", "the val split lists no images", "AP is undefined"]),
    "val_without_boxes": (
        lambda root: _custom(root, val=_no_val_boxes),
        ["val.json", "the val split has 3 image(s) but no boxes", "AP is undefined"]),
    "train_with_crowd_boxes_only": (
        lambda root: _custom(root, train=_crowd_only),
        ["train.json", "the train split has 3 image(s) but no boxes", "nothing to learn"]),
    "yolo_labels_folder_misnamed": (
        _yolo_without_labels,
        ["labels folder not found", "labels/train", "holds: data.yaml, images, label"]),
    "yolo_label_not_utf8": (
        _yolo_latin1_label,
        ["labels/train/1.txt: line 2 is not UTF-8 text", "byte 0xe9", "save the file as UTF-8"]),
}


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(case: str, root: Path) -> tuple[subprocess.CompletedProcess, dict[str, str], dict[str, str]]:
    write, _ = CASES[case]
    flags = write(root / "data")
    out = root / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept from an earlier run\n")
    (out / "log.txt").write_text('{"epoch": 0}\n')
    before = _hashes(out)
    result = subprocess.run([sys.executable, "main.py", *TINY, *flags, "--output_dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    return result, before, _hashes(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every case's command, two at a time (each spends its seconds importing torch)."""
    roots = {case: tmp_path_factory.mktemp(case) for case in CASES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(_run, case, roots[case]) for case in CASES}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", CASES)
def test_refused_before_the_model_with_one_line_and_output_dir_untouched(runs, case):
    result, before, after = runs[case]
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for part in CASES[case][1]:
        assert part in errors[0], (part, errors[0])
    assert "Traceback" not in result.stderr
    assert "number of params" not in result.stdout  # refused before the model was built
    assert {name: after.get(name) for name in before} == before
    assert set(after) - set(before) <= {".run.lock"}  # main.py's lock on the folder (util/run_lock.py)
