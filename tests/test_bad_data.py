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
