"""--mosaic / --box_paste / --aug_off_epochs: geometry, training set only, determinism, flag errors."""
import argparse
import json

import pytest
import torch
from PIL import Image, ImageDraw

import main
from datasets import build_dataset
from datasets.box_paste import paste_boxes
from datasets.mosaic import BACKGROUND, mosaic
from datasets.object_augment import set_epoch
from util.checkpoint import load_checkpoint

COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (250, 0, 250), (0, 250, 250), (250, 250, 250)]


def _tile(size, rects, colour_offset, masks=False):
    """Black image [3,h,w] with solid rectangles (x0, y0, x1, y1) in distinct colours, and its target."""
    h, w = size
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(rects):
        image[:, y0:y1, x0:x1] = torch.tensor(COLOURS[colour_offset + k], dtype=torch.uint8)[:, None, None]
    target = {"boxes": torch.tensor(rects, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.arange(colour_offset, colour_offset + len(rects)),
              "area": torch.tensor([(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in rects], dtype=torch.float32),
              "iscrowd": torch.zeros(len(rects), dtype=torch.int64), "image_id": torch.tensor([1]),
              "orig_size": torch.tensor([h, w]), "size": torch.tensor([h, w])}
    if masks:
        target["masks"] = torch.zeros((len(rects), h, w), dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(rects):
            target["masks"][k, y0:y1, x0:x1] = 1
    return image, target


def _pixels_of(image, colour):
    """Mask of pixels close to `colour` (resizing blurs the edges; the core keeps the colour)."""
    return (image.int() - torch.tensor(colour)[:, None, None]).abs().max(0).values < 60


def _tiles(masks=False):
    return [_tile((60, 80), [(5, 5, 30, 25), (50, 35, 75, 58)], 0, masks),
            _tile((50, 70), [(40, 2, 65, 20)], 2, masks),
            _tile((64, 64), [(2, 30, 20, 60), (30, 5, 60, 28)], 3, masks),
            _tile((40, 90), [(10, 10, 40, 35)], 5, masks)]


@pytest.mark.parametrize("centre, scale", [((40, 30), 0.5), ((25, 40), 0.8), ((60, 15), 1.0), ((33, 27), 0.63)])
def test_mosaic_boxes_cover_their_rectangles_pixels(centre, scale):
    tiles = _tiles()
    image, target = mosaic(tiles, centre, scale)
    assert image.shape == (3, 60, 80) and target["image_id"].item() == 1
    assert len(target["boxes"]) == len(target["labels"]) == len(target["area"]) == len(target["iscrowd"])
    assert len(target["boxes"]) >= 1
    seen = set()
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        seen.add(label)
        pixels = _pixels_of(image, COLOURS[label])
        ys, xs = torch.nonzero(pixels, as_tuple=True)
        assert len(ys) > 0, label
        x0, y0, x1, y1 = box
        # every pixel of the object lies in its box, to rounding
        assert xs.min() >= x0 - 1 and xs.max() + 1 <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() + 1 <= y1 + 1
        # and the box is filled by the object (not larger than it, to rounding)
        assert xs.min() <= x0 + 1 and xs.max() + 1 >= x1 - 1 and ys.min() <= y0 + 1 and ys.max() + 1 >= y1 - 1
    # an object whose colour is nowhere on the canvas has no box (cut away), and vice versa
    for label, colour in enumerate(COLOURS[:6]):
        if label not in seen:
            assert _pixels_of(image, colour).sum() <= 2, label


def test_mosaic_drops_cut_away_boxes_and_carries_masks():
    tiles = _tiles(masks=True)
    # centre near the top-left corner: tile 0 (above-left) keeps only a 3x3 corner, tile 3 fills most
    image, target = mosaic(tiles, (3, 3), 1.0)
    assert 0 not in target["labels"].tolist() and 1 not in target["labels"].tolist()
    assert target["masks"].shape == (len(target["labels"]), 60, 80) and target["masks"].dtype == torch.uint8
    for mask, box in zip(target["masks"], target["boxes"].tolist()):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == \
            pytest.approx(box, abs=1)
    # at scale 0.5 tile 0 (80x60 -> 40x30) ends 40 px left of and 30 px above the centre: grey beyond it
    image, _ = mosaic(tiles, (75, 55), 0.5)
    assert (image[:, :25, :35] == BACKGROUND).all() and not (image[:, 25:55, 35:75] == BACKGROUND).all()


def test_box_paste_puts_rectangles_where_no_box_is():
    image, target = _tile((60, 80), [(0, 0, 40, 30)], 0)
    source, source_target = _tile((50, 60), [(3, 4, 15, 20), (30, 30, 45, 41)], 3)
    out, new = paste_boxes(image, target, source, source_target, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image, _tile((60, 80), [(0, 0, 40, 30)], 0)[0])  # input untouched
    assert new["labels"][:1].tolist() == [0] and sorted(new["labels"][1:].tolist()) == [3, 4]
    for box, label in zip(new["boxes"][1:].tolist(), new["labels"][1:].tolist()):
        x0, y0, x1, y1 = map(int, box)
        assert (x1 - x0, y1 - y0) == {3: (12, 16), 4: (15, 11)}[label]
        assert _pixels_of(out[:, y0:y1, x0:x1], COLOURS[label]).all()  # the rectangle is the object
        assert x0 >= 40 or y0 >= 30  # overlaps nothing already there
    a, b = new["boxes"][1].tolist(), new["boxes"][2].tolist()
    assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])  # nor each other
    with pytest.raises(ValueError, match="--box_paste.*--copy_paste"):
        paste_boxes(*_tile((60, 80), [(0, 0, 4, 3)], 0, masks=True), source, source_target, 1)


def _write_custom(root):
    """10 pictures of solid rectangles as a boxes-only COCO export; returns the dataset args."""
    (root / "img").mkdir(parents=True)
    images, annotations = [], []
    for i in range(10):
        picture = Image.new("RGB", (96, 72), (0, 0, 0))
        x, y = 5 + 6 * i, 4 + 3 * i
        ImageDraw.Draw(picture).rectangle((x, y, x + 23, y + 17), fill=COLOURS[i % 3])
        picture.save(root / "img" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 96, "height": 72})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 3, "bbox": [x, y, 24, 18],
                            "area": 432, "iscrowd": 0})
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}))
    return argparse.Namespace(dataset_file="custom", train_images=str(root / "img"),
                              train_annotations=str(root / "ann.json"), val_images=str(root / "img"),
                              val_annotations=str(root / "ann.json"), num_classes=None, masks=False,
                              image_scale=0.1, augment="none", copy_paste=0, mosaic=1.0, box_paste=2,
                              aug_off_epochs=1, epochs=3)


def test_training_set_only_seeded_and_off_in_the_last_epochs(tmp_path):
    args = _write_custom(tmp_path)
    train, val = build_dataset("train", args), build_dataset("val", args)
    assert val.object_augment is None
    state = torch.get_rng_state()
    plain = [val[i] for i in range(10)]
    assert torch.equal(torch.get_rng_state(), state)  # validation draws nothing
    torch.manual_seed(3)
    first = [train[i] for i in range(10)]
    torch.manual_seed(3)
    again = [train[i] for i in range(10)]
    more = 0
    for (image, target), (image_a, target_a), (_, target_p) in zip(first, again, plain):
        assert torch.equal(image, image_a) and torch.equal(target["boxes"], target_a["boxes"])
        more += len(target["labels"]) - len(target_p["labels"])
    assert more > 10  # mosaics of 4 single-object pictures plus pasted boxes
    set_epoch(train, 2, args)  # the last epoch: off, items are the validation-like ones
    state = torch.get_rng_state()
    for i in range(10):
        image, target = train[i]
        assert torch.equal(image, plain[i][0]) and torch.equal(target["boxes"], plain[i][1]["boxes"])
    assert torch.equal(torch.get_rng_state(), state)
    set_epoch(train, 1, args)
    assert train.object_augment.active


@pytest.mark.parametrize("flag, value, message", [
    ("mosaic", 1.5, r"--mosaic 1\.5: .*\[0, 1\]"), ("box_paste", -1, "--box_paste -1"),
    ("aug_off_epochs", -2, "--aug_off_epochs -2")])
def test_bad_values_name_the_flag(tmp_path, flag, value, message):
    args = _write_custom(tmp_path)
    setattr(args, flag, value)
    with pytest.raises(ValueError, match=message):
        build_dataset("train", args)


def test_box_paste_with_masks_and_panoptic_sets_are_refused(tmp_path):
    args = argparse.Namespace(dataset_file="shapes_panoptic", data_path=str(tmp_path / "s"), shapes_train_size=4,
                              shapes_val_size=2, shapes_image_size=48, image_scale=0.1, masks=True,
                              num_classes=None, augment="none", copy_paste=0, mosaic=0.5, box_paste=0)
    with pytest.raises(ValueError, match="--mosaic: --dataset_file shapes_panoptic is not a detection set"):
        build_dataset("train", args)
    args.dataset_file, args.mosaic, args.box_paste = "shapes", 0.0, 1
    with pytest.raises(ValueError, match="--box_paste 1: .*with --masks use --copy_paste"):
        build_dataset("train", args)


TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "8", "--image_scale", "0.16",
        "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "6", "--shapes_val_size", "2",
        "--batch_size", "2", "--print_freq", "100", "--eval_every", "0", "--num_workers", "0",
        "--mosaic", "0.7", "--box_paste", "2", "--aug_off_epochs", "1"]


def test_resume_reproduces_the_augmented_epochs(tmp_path):
    """3 epochs straight == resume from the straight run's epoch-0 checkpoint (augmented epoch 1, plain epoch 2)."""
    def train(out, resume=None):
        flags = [*TINY, "--data_path", str(tmp_path / "shapes"), "--epochs", "3", "--lr_drop", "1",
                 "--output_dir", str(out)]
        main.main(main.get_args_parser().parse_args(flags + (["--resume", str(resume)] if resume else [])))
        return load_checkpoint(out / "checkpoint.pth")["model"]

    straight = train(tmp_path / "straight")
    resumed = train(tmp_path / "resumed", resume=tmp_path / "straight" / "checkpoint0000.pth")
    epoch1 = load_checkpoint(tmp_path / "straight" / "checkpoint0001.pth")["model"]
    assert not torch.equal(epoch1["class_embed.weight"], straight["class_embed.weight"])
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_yolo_layout_gets_mosaic_and_box_paste(tmp_path):
    """A YOLO txt export (read as a CocoDetection): two solid rectangles per picture, boxes only."""
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for i in range(4):
            picture = Image.new("RGB", (80, 60), (0, 0, 0))
            ImageDraw.Draw(picture).rectangle((4 + 3 * i, 6, 4 + 3 * i + 19, 6 + 11), fill=COLOURS[0])
            ImageDraw.Draw(picture).rectangle((50, 30 + i, 50 + 23, 30 + i + 17), fill=COLOURS[1])
            picture.save(tmp_path / "images" / split / f"{i}.png")
            (tmp_path / "labels" / split / f"{i}.txt").write_text(
                f"0 {(4 + 3 * i + 10) / 80} {12 / 60} {20 / 80} {12 / 60}\n"
                f"1 {62 / 80} {(39 + i) / 60} {24 / 80} {18 / 60}\n")
    (tmp_path / "data.yaml").write_text("names: [red, green]\n")
    args = argparse.Namespace(dataset_file="yolo", data_path=str(tmp_path), num_classes=None, masks=False,
                              image_scale=0.1, augment="none", copy_paste=0, mosaic=1.0, box_paste=1,
                              aug_off_epochs=0, epochs=1, eval=False, eval_every=1)
    train, val = build_dataset("train", args), build_dataset("val", args)
    assert train.object_augment is not None and val.object_augment is None
    torch.manual_seed(0)
    image, target = train.object_augment(train, *train.load(0))
    assert len(target["boxes"]) >= 3  # two per tile, some cut away, up to one pasted
    checked = 0
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        x0, y0, x1, y1 = box
        if min(x1 - x0, y1 - y0) < 4:  # a sliver left at a tile edge: no interior to look at
            continue
        inside = _pixels_of(image[:, int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1], COLOURS[label])
        assert inside.float().mean() > 0.9, (box, label)  # each box holds its rectangle's colour
        checked += 1
    assert checked >= 2
