"""The bad-input matrix of the data side: each case a clear message naming the file, or a documented result."""
import json
import logging
import random

import numpy as np
import PIL.Image
import pytest
from PIL import Image, ImageOps

from datasets.coco import CocoDetection, decode_image, decode_image_pil
from datasets.transforms import make_detr_transforms


def _write_coco(root, annotations, images=None, categories=(1, 2)):
    (root / "img").mkdir(exist_ok=True)
    images = images or [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}]
    for info in images:
        path = root / "img" / info["file_name"]
        if not path.exists():
            Image.new("RGB", (info["width"], info["height"]), (90, 120, 150)).save(path)
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": c, "name": f"c{c}"} for c in categories]}))
    return root / "img", ann_file


def _ann(id, bbox, category=1, image_id=1):
    return {"id": id, "image_id": image_id, "category_id": category, "bbox": bbox, "area": 1.0, "iscrowd": 0}


def test_truncated_jpeg_names_the_file_and_the_annotation_file(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [])
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "a.jpg")  # the cut then falls inside the pixel data
    data = (folder / "a.jpg").read_bytes()
    (folder / "a.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"a\.jpg.*instances\.json.*truncated"):
        CocoDetection(folder, ann_file, None)[0]


def test_file_that_is_not_an_image(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [])
    (folder / "a.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"unreadable image .*a\.jpg"):
        CocoDetection(folder, ann_file, None)[0]


def test_missing_image_names_the_file_and_the_annotation_file(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [])
    (folder / "a.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*a\.jpg \(listed in .*instances\.json\)"):
        CocoDetection(folder, ann_file, None)[0]


def test_zero_byte_annotation_file(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [])
    ann_file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"instances\.json is empty \(0 bytes\)"):
        CocoDetection(folder, ann_file, None)


def test_malformed_json(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [])
    ann_file.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"instances\.json is not valid JSON"):
        CocoDetection(folder, ann_file, None)
    ann_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"instances\.json is not COCO format"):
        CocoDetection(folder, ann_file, None)


def test_boxes_without_width_or_height_are_dropped_and_counted(tmp_path, caplog):
    anns = [_ann(1, [5, 5, 10, 10]), _ann(2, [5, 5, 0, 10]), _ann(3, [5, 5, 10, -3]),
            _ann(4, [100, 5, 10, 10])]  # the last lies right of the 64 px image: nothing left after clamping
    folder, ann_file = _write_coco(tmp_path, anns)
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        dataset = CocoDetection(folder, ann_file, None)
    assert dataset.degenerate_boxes == 3
    assert "3 box(es) with width or height <= 0" in caplog.text and "instances.json" in caplog.text
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[5, 5, 15, 15]] and target["labels"].tolist() == [1]


def test_box_partly_outside_the_image_is_clamped(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [-10, 40, 30, 30]), _ann(2, [50, -5, 30, 10])])
    _, target = CocoDetection(folder, ann_file, None)[0]
    assert target["boxes"].tolist() == [[0, 40, 20, 48], [50, 0, 64, 5]]


def test_category_id_beyond_num_classes_names_annotation_image_and_fix(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [5, 5, 10, 10]), _ann(17, [5, 5, 10, 10], category=12)],
                                   categories=(1, 12))
    with pytest.raises(ValueError) as err:
        CocoDetection(folder, ann_file, None, num_classes=10)
    message = str(err.value)
    for part in ("annotation id 17", "a.jpg", "category id 12", "num_classes=10", "--num_classes 13"):
        assert part in message
    assert len(CocoDetection(folder, ann_file, None, num_classes=13)) == 1


def test_image_without_annotations_trains_with_an_empty_target(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [])
    dataset = CocoDetection(folder, ann_file, make_detr_transforms("train", image_scale=0.1), return_masks=True)
    for seed in range(6):  # both branches of the recipe, crop included
        random.seed(seed)
        image, target = dataset[0]
        assert image.dim() == 3 and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["masks"].shape == (0, *image.shape[-2:])


def _pixels(h=30, w=40):
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


@pytest.mark.parametrize("mode,suffix", [("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg"), ("RGBA", "png"), ("P", "png"),
                                         ("RGB", "bmp")])
def test_other_colour_modes_decode_to_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"image.{suffix}"
    Image.fromarray(_pixels()).convert(mode).save(path)
    expected = np.asarray(Image.open(path).convert("RGB"))
    for decoded in (decode_image(path).permute(1, 2, 0).numpy(), np.asarray(decode_image_pil(path))):
        assert decoded.shape == (30, 40, 3)
        assert np.abs(decoded.astype(int) - expected).max() <= 1


def test_16_bit_png_keeps_its_top_8_bits(tmp_path):
    values = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    expected = [0, 0, 1, 156, 255]  # value >> 8
    assert decode_image(tmp_path / "deep.png")[:, 0].tolist() == [expected] * 3
    assert np.asarray(decode_image_pil(tmp_path / "deep.png"))[0, :, 0].tolist() == expected


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue as stored
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left side ends on top
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    fast = decode_image(path)
    assert fast.shape == (3, 40, 20)
    assert fast[0, :15].float().mean() > 200 and fast[2, 25:].float().mean() > 200  # red top, blue bottom
    assert np.abs(fast.permute(1, 2, 0).numpy().astype(int) - expected).max() <= 2
    assert np.asarray(decode_image_pil(path)).shape == (40, 20, 3)


def test_decompression_bomb_is_refused_with_the_limit_and_fix(tmp_path, monkeypatch):
    folder, ann_file = _write_coco(tmp_path, [])
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 = 3072 pixels is now "a bomb"
    for decode in (decode_image, decode_image_pil):
        with pytest.raises(ValueError, match=r"a\.jpg.*decompression-bomb limit.*MAX_IMAGE_PIXELS = 1000"):
            decode(folder / "a.jpg", ann_file)
    with pytest.raises(ValueError, match="instances.json"):
        CocoDetection(folder, ann_file, None)[0]
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 4000)
    assert decode_image(folder / "a.jpg").shape == (3, 48, 64)


# ---------------------------------------------------------------------------------------------
# Entries that would train or evaluate on the wrong thing: refused when the file is read


def _three_images(data):
    data["images"] = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in (1, 2, 3)]
    data["annotations"] = [_ann(i, [5, 5, 10, 10], image_id=i) for i in (1, 2, 3)]


def _set(key, index, **fields):
    return lambda data: data[key][index].update(fields)


@pytest.mark.parametrize("change, message", [
    (_set("images", 1, id=1), "'images' id 1 is used twice (file_name '1.jpg' and '2.jpg')"),
    (_set("images", 2, file_name="1.jpg"), "file_name 1.jpg is listed 2 times (image ids 1, 3)"),
    (_set("images", 1, id="2"), "'images' entry 1 (file_name '2.jpg') has id '2', expected an integer"),
    (_set("images", 1, file_name=""), "image id 2 has file_name ''"),
    (_set("images", 1, width=0), "image id 2 (2.jpg) has width 0"),
    (_set("images", 1, height="48"), "image id 2 (2.jpg) has height '48'"),
    (_set("annotations", 1, id=1), "'annotations' id 1 is used twice (image_id 1 and 2)"),
    (_set("annotations", 2, id=None), "'annotations' entry 2 (image_id 3) has id None"),
    (_set("annotations", 1, image_id="2"), "annotation id 2 has image_id '2'"),
    (_set("annotations", 1, category_id=7), "annotation id 2 has category_id 7, which is not an id of 'categories' "
                                            "(listed: 1, 2)"),
    (_set("annotations", 1, category_id="1"), "annotation id 2 has category_id '1'"),
    (_set("annotations", 1, category_id=[1]), "annotation id 2 has category_id [1]"),
    (_set("annotations", 1, bbox=[5, 5, 10]), "annotation id 2 has bbox [5, 5, 10], expected [x, y, width, height]"),
    (_set("annotations", 1, bbox=["5", 5, 10, 10]), "annotation id 2 has bbox ['5', 5, 10, 10]"),
    (_set("annotations", 1, bbox=[5, 5, float("inf"), 10]), "annotation id 2 has bbox [5, 5, inf, 10]"),
    (_set("annotations", 1, bbox=[float("nan"), 5, 10, 10]), "annotation id 2 has bbox [nan, 5, 10, 10]"),
    (_set("annotations", 1, bbox=None), "annotation id 2 has bbox None"),
    (_set("annotations", 1, iscrowd=2), "annotation id 2 has iscrowd 2, expected 0 or 1"),
    (_set("annotations", 1, area=float("nan")), "annotation id 2 has area nan"),
    (lambda data: data["categories"].append({"id": 2, "name": "again"}),
     "'categories' id 2 is used twice (name 'c2' and 'again')"),
    (lambda data: data.pop("categories"), "has annotations but no 'categories' list"),
    (lambda data: data.update(annotations={}), "'annotations' is a dict, expected a list of objects"),
    (lambda data: data["images"].append("3.jpg"), "'images' entry 3 is '3.jpg', expected an object"),
])
def test_entry_that_would_train_on_the_wrong_thing_is_refused(tmp_path, change, message):
    folder, ann_file = _write_coco(tmp_path, [])
    data = json.loads(ann_file.read_text())
    _three_images(data)
    change(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        CocoDetection(folder, ann_file, None)
    assert str(ann_file) in str(err.value) and message in str(err.value)


def test_annotation_file_not_utf8_names_the_line(tmp_path):
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [5, 5, 10, 10])])
    text = ann_file.read_text().replace('"name": "c1"', '"name":\n "caf\u00e9"')
    ann_file.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"instances\.json: line 2 is not UTF-8 text \(byte 0xe9"):
        CocoDetection(folder, ann_file, None)
    ann_file.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a byte-order mark is read
    assert CocoDetection(folder, ann_file, None).category_names[1] == "caf\u00e9"


def test_annotations_of_unlisted_images_are_noted_with_counts(tmp_path, caplog):
    anns = [_ann(1, [5, 5, 10, 10]), _ann(2, [5, 5, 10, 10], image_id=9), _ann(3, [5, 5, 10, 10], image_id=9)]
    folder, ann_file = _write_coco(tmp_path, anns)
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        dataset = CocoDetection(folder, ann_file, None)
    assert ("instances.json: 2 annotation(s) refer to an image id not in 'images' and are not used "
            "(first: annotation id 2, image_id 9)") in caplog.text
    assert dataset.num_boxes == 1 and dataset[0][1]["boxes"].tolist() == [[5, 5, 15, 15]]


# ---------------------------------------------------------------------------------------------
# Before a run: pictures present, their sizes as the JSON says, images and boxes in the split


def _custom_args(folder, ann_file, **flags):
    import argparse
    return argparse.Namespace(dataset_file="custom", train_images=str(folder), train_annotations=str(ann_file),
                              val_images=str(folder), val_annotations=str(ann_file), num_classes=None,
                              masks=False, image_scale=0.1, **flags)


def test_missing_pictures_are_found_before_training_with_count(tmp_path):
    from datasets import build_dataset

    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in range(1, 6)]
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [5, 5, 10, 10])], images=images)
    for i in (2, 4, 5):
        (folder / f"{i}.jpg").unlink()
    with pytest.raises(ValueError) as err:
        build_dataset("train", _custom_args(folder, ann_file))
    assert f"instances.json lists 3 image file(s) of 5 that are not in {folder} (2.jpg, 4.jpg, 5.jpg)" in str(err.value)
    assert len(CocoDetection(folder, ann_file, None)) == 5  # the constructor alone stays cheap


@pytest.mark.parametrize("size, message", [
    ((32, 24), "a.jpg is 32x24 but the annotation file says 64x48"),
    ((48, 64), "a.jpg is 48x64 but the annotation file says 64x48, width and height swapped"),
])
def test_picture_size_other_than_the_json_is_refused_before_training(tmp_path, size, message):
    from datasets import build_dataset

    folder, ann_file = _write_coco(tmp_path, [_ann(1, [5, 5, 10, 10])])
    Image.new("RGB", size).save(folder / "a.jpg")
    with pytest.raises(ValueError) as err:
        build_dataset("train", _custom_args(folder, ann_file))
    assert "instances.json: 1 of 1 picture(s) differ" in str(err.value) and message in str(err.value)


def test_picture_size_of_a_large_split_is_noted_when_read(tmp_path, caplog, monkeypatch):
    import datasets.coco
    from datasets import build_dataset

    monkeypatch.setattr(datasets.coco, "SIZE_CHECK_LIMIT", 0)  # as for a split too large to read every header
    folder, ann_file = _write_coco(tmp_path, [_ann(1, [5, 5, 10, 10])])
    Image.new("RGB", (32, 24)).save(folder / "a.jpg")
    dataset = build_dataset("train", _custom_args(folder, ann_file))
    dataset._transforms = None
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        dataset[0]
        dataset[0]
    assert caplog.text.count("a.jpg is 32x24 but the annotation file says 64x48; its boxes are used as given") == 1


@pytest.mark.parametrize("annotations, split, flags, message", [
    (None, "train", {}, "the train split lists no images: there is nothing to learn"),
    (None, "val", {}, "the val split lists no images: COCO AP is undefined"),
    ([], "train", {}, "the train split has 1 image(s) but no boxes (0 annotation(s)"),
    ([], "val", {}, "the val split has 1 image(s) but no boxes (0 annotation(s)"),
    ([dict(_ann(1, [5, 5, 10, 10]), iscrowd=1), _ann(2, [70, 5, 10, 10])], "train", {},
     "the train split has 1 image(s) but no boxes (2 annotation(s), none a non-crowd box"),
    ([], "val", {"eval": True}, "the val split has 1 image(s) but no boxes"),
])
def test_split_without_images_or_boxes_is_refused(tmp_path, annotations, split, flags, message):
    from datasets import build_dataset

    folder, ann_file = _write_coco(tmp_path, annotations or [])
    if annotations is None:
        ann_file.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(ValueError) as err:
        build_dataset(split, _custom_args(folder, ann_file, **flags))
    assert str(ann_file) in str(err.value) and message in str(err.value)


def test_splits_the_run_does_not_read_are_not_refused_for_emptiness(tmp_path):
    from datasets import build_dataset

    folder, ann_file = _write_coco(tmp_path, [])
    assert len(build_dataset("train", _custom_args(folder, ann_file, eval=True))) == 1  # --eval: train unused
    assert len(build_dataset("val", _custom_args(folder, ann_file, eval_every=0))) == 1  # never evaluated
