"""predict.py: a folder of mixed pictures -> predictions.json (loadRes-valid) + one drawn picture each;
the modules it reads, scores and draws with (util/pictures.py, util/detections.py, util/drawing.py)
and takes the model's flags from the checkpoint with (util/model_flags.py)."""
import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import predict
from util.detections import detections
from util.drawing import DRAW_MIN_LONG_SIDE, colour_for, draw_detections, draw_enlarged, drawing_scale, place_label
from util.model_flags import apply_checkpoint_args, shape_args_from_state_dict
from util.pictures import aspect_ratio_order, load_rgb

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "10", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu"]
SPEC = Path(__file__).resolve().parent / "data" / "state_dict"  # the released layouts


# ---------------------------------------------------------------------------------------------
# Pictures in: EXIF, modes, non-pictures


def _exif_rotated(path: Path) -> None:
    """A 40x20 picture stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    stored = Image.new("RGB", (20, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 10))  # red at the stored top -> displayed at the right
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif.tobytes())


def test_load_rgb_honours_exif_orientation(tmp_path):
    _exif_rotated(tmp_path / "rot.jpg")
    image = load_rgb(tmp_path / "rot.jpg")
    assert image.size == (40, 20) and image.mode == "RGB"
    right, left = image.getpixel((35, 10)), image.getpixel((5, 10))
    assert right[0] > 200 and right[2] < 60
    assert left[2] > 200 and left[0] < 60


def test_load_rgb_converts_every_mode(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    Image.new("L", (8, 8), 100).save(tmp_path / "g.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    Image.fromarray(np.full((8, 8), 4000, dtype=np.uint16)).save(tmp_path / "d.png")
    a = load_rgb(tmp_path / "a.png")
    assert a.getpixel((0, 0)) == (255, 255, 255) and a.getpixel((1, 1)) == (255, 0, 0)  # alpha over white
    assert load_rgb(tmp_path / "g.png").getpixel((3, 3)) == (100, 100, 100)
    cyan_free = load_rgb(tmp_path / "c.jpg").getpixel((3, 3))
    assert cyan_free[0] > 200 and cyan_free[1] < 60
    assert load_rgb(tmp_path / "d.png").mode == "RGB"


def test_load_rgb_warns_and_skips_text(tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.warns(UserWarning, match=r"skipping .*notes.txt: not a readable picture"):
        assert load_rgb(tmp_path / "notes.txt") is None


# ---------------------------------------------------------------------------------------------
# Post-processing and flags


def test_detections_restricts_to_real_categories_and_scales_boxes():
    logits = torch.tensor([[[0.0, 5.0, 1.0, 0.0], [0.0, 0.0, 0.5, 3.0]]])  # 3 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    out = detections({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100.0, 200.0]]),
                             valid_ids=[0, 2], threshold=0.01)[0]
    # Query 0 prefers class 1, which is not a category: its best real class is 2.
    assert out["labels"].tolist() == [2, 2]
    probs = logits.softmax(-1)[0]
    assert out["scores"].tolist() == pytest.approx([probs[0, 2].item(), probs[1, 2].item()])
    assert out["boxes"][0].tolist() == pytest.approx([50.0, 25.0, 150.0, 75.0])
    high = detections({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100.0, 200.0]]),
                              valid_ids=None, threshold=0.5)[0]
    assert high["labels"].tolist() == [1] and high["queries"].tolist() == [0]


def _tsv_state_dict(name):
    state = {}
    for line in (SPEC / f"{name}.tsv").read_text().splitlines():
        if not line.startswith("#") and line.strip():
            key, shape, _ = line.split("\t")
            state[key] = torch.zeros([int(d) for d in re.findall(r"\d+", shape)])
    return state


def test_shape_flags_inferred_from_released_weights():
    r50 = shape_args_from_state_dict(_tsv_state_dict("detr_resnet50"))
    assert r50 == {"masks": False, "num_classes": 91, "num_queries": 100, "hidden_dim": 256, "enc_layers": 6,
                   "dec_layers": 6, "dim_feedforward": 2048, "pre_norm": False, "backbone": "resnet50"}
    panoptic = shape_args_from_state_dict(_tsv_state_dict("detr_resnet50_panoptic"))
    assert panoptic["masks"] and panoptic["num_classes"] == 250
    assert shape_args_from_state_dict(_tsv_state_dict("detr_resnet101"))["backbone"] == "resnet101"


def test_explicit_flags_beat_checkpoint_args():
    argv = ["--resume", "x.pth", "--img_dirs", "d", "--nheads", "4", "--threshold", "0.3"]
    args = predict.get_args_parser().parse_args(argv)
    saved = argparse.Namespace(**vars(args))
    saved.nheads, saved.enc_layers, saved.threshold, saved.device, saved.dropout = 2, 3, 0.9, "cuda", 0.25
    saved.batch_size, saved.image_scale, saved.eos_coef = 7, 0.5, 0.3  # main.py's flags of the training run
    state = {"class_embed.weight": torch.zeros(6, 8), "query_embed.weight": torch.zeros(7, 8)}
    merged = apply_checkpoint_args(args, predict.get_args_parser, argv, {"model": state, "args": saved})
    assert merged.nheads == 4  # explicit
    assert merged.dropout == 0.25  # from the checkpoint's args
    assert (merged.num_classes, merged.num_queries, merged.hidden_dim) == (5, 7, 8)  # from its weights
    assert merged.threshold == 0.3 and merged.device is None  # run options never come from the checkpoint
    assert merged.batch_size == 2  # predict.py's own flag, at its default
    assert (merged.image_scale, merged.eos_coef) == (0.5, 0.3)  # training settings predict.py has no flag for
    assert merged.backbone_weights == "checkpoint" and merged.frozen_weights is None  # weights come from it


# ---------------------------------------------------------------------------------------------
# End to end


def _tiny_checkpoint(path: Path, extra: list[str] = ()) -> argparse.Namespace:
    import main
    from models import build_model

    args = main.get_args_parser().parse_args(TINY + ["--num_classes", "5", *extra])
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0,
                "category_names": {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}}, path)
    return args


def _picture_folder(root: Path) -> Path:
    folder = root / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / "photo.jpg")
    rgba = rng.integers(0, 255, (100, 80, 4), dtype=np.uint8)
    rgba[:10, :, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8), mode="L").save(folder / "gray.png")
    _exif_rotated(folder / "rotated.jpg")
    (folder / "readme.txt").write_text("not a picture")
    return folder


def _changed_fraction_on_outline(original: Image.Image, drawn: Image.Image, bbox: list[float]) -> float:
    a, b = np.asarray(original, dtype=int), np.asarray(drawn, dtype=int)
    x0, y0 = int(bbox[0]), int(bbox[1])
    x1, y1 = min(int(bbox[0] + bbox[2]), a.shape[1] - 1), min(int(bbox[1] + bbox[3]), a.shape[0] - 1)
    ys = np.arange(y0, y1 + 1)
    changed = np.abs(a[ys, x0] - b[ys, x0]).sum(-1) > 0  # the left edge
    return float(changed.mean())


def test_predict_folder_end_to_end(tmp_path, recwarn, malloc_tuning_calls):
    _tiny_checkpoint(tmp_path / "ckpt.pth")
    folder = _picture_folder(tmp_path)
    out = tmp_path / "out"
    summary = predict.main(["--resume", str(tmp_path / "ckpt.pth"), "--img_dirs", str(folder),
                            "--output_dir", str(out), "--threshold", "0", "--batch_size", "3"])
    assert summary["images"] == 4
    assert summary["skipped"] == [{"path": str(folder / "readme.txt"), "reason": "not a readable picture"}]
    assert malloc_tuning_calls == [True]  # on the CPU, glibc keeps freed memory (fast/allocator.py)
    assert any("readme.txt" in str(w.message) for w in recwarn)

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "images.json"))
        dt = gt.loadRes(str(out / "predictions.json"))
    assert len(dt.getAnnIds()) == 4 * 10  # threshold 0 keeps every query
    images = {im["file_name"]: im for im in json.loads((out / "images.json").read_text())["images"]}
    assert set(images) == {"pics/photo.jpg", "pics/alpha.png", "pics/gray.png", "pics/rotated.jpg"}
    assert (images["pics/rotated.jpg"]["width"], images["pics/rotated.jpg"]["height"]) == (40, 20)
    predictions = json.loads((out / "predictions.json").read_text())
    for p in predictions:
        assert p["category_name"] == ["zero", "one", "two", "three", "four"][p["category_id"]]
        image = images[p["file_name"]]
        assert p["image_id"] == image["id"]
        x, y, w, h = p["bbox"]
        assert 0 <= x <= x + w <= image["width"] + 1e-3 and 0 <= y <= y + h <= image["height"] + 1e-3

    for name in images:
        drawn_path = out / "pictures" / f"{name}.png"  # the extension kept: a.jpg and a.png cannot collide
        drawn = Image.open(drawn_path).convert("RGB")
        original = load_rgb(folder / Path(name).name)
        # Small pictures are drawn enlarged by a whole factor: 70-120 px -> at least 512 px long side.
        factor = drawing_scale(original.size)
        assert factor > 1 and drawn.size == (original.width * factor, original.height * factor)
        assert max(drawn.size) >= DRAW_MIN_LONG_SIDE
        enlarged = original.resize(drawn.size, Image.BICUBIC)
        mine = [p for p in predictions if p["file_name"] == name]
        biggest = max(mine, key=lambda p: p["bbox"][2] * p["bbox"][3])
        assert _changed_fraction_on_outline(enlarged, drawn, [v * factor for v in biggest["bbox"]]) > 0.5, name
    assert not list((out / "pictures").rglob("readme*"))


def _same_detections(found: list[dict], reference: list[dict]) -> None:
    """Equal up to fp32 rounding (scores are written with 5 decimals, boxes with 2)."""
    assert len(found) == len(reference)
    for a, b in zip(found, reference):
        assert (a["image_id"], a["file_name"], a["category_id"]) == (b["image_id"], b["file_name"], b["category_id"])
        assert abs(a["score"] - b["score"]) <= 1e-4
        assert np.allclose(a["bbox"], b["bbox"], atol=0.02)


def test_fused_and_onnxruntime_predict_what_the_plain_model_predicts(tmp_path, capsys, malloc_tuning_calls):
    """predict.py folds the (eval-mode) BatchNorm into the convolutions and uses channels_last by
    default; --no_fuse runs the model as built; --inference_backend onnxruntime exports the folded
    model once next to the checkpoint and reuses the file. Same detections up to fp32 rounding."""
    _tiny_checkpoint(tmp_path / "ckpt.pth")
    folder = _picture_folder(tmp_path)
    found = {}
    for mode, extra in (("fused", []), ("plain", ["--no_fuse"]), ("ort", ["--inference_backend", "onnxruntime"]),
                        ("ort_cached", ["--inference_backend", "onnxruntime"])):
        with pytest.warns(UserWarning, match="readme.txt: not a readable picture"):
            predict.main(["--resume", str(tmp_path / "ckpt.pth"), "--img_dirs", str(folder), "--output_dir",
                          str(tmp_path / mode), "--threshold", "0", "--device", "cpu", "--batch_size", "2", *extra])
        found[mode] = json.loads((tmp_path / mode / "predictions.json").read_text())
    assert len(found["plain"]) == 4 * 10
    assert len(malloc_tuning_calls) == 4
    predict.main(["--resume", str(tmp_path / "ckpt.pth"), "--img_dirs", str(folder / "gray.png"),
                  "--output_dir", str(tmp_path / "untuned"), "--device", "cpu", "--no_malloc_tuning"])
    assert len(malloc_tuning_calls) == 4  # --no_malloc_tuning leaves the allocator alone
    for mode in ("fused", "ort", "ort_cached"):
        _same_detections(found[mode], found["plain"])
    exports = list(tmp_path.glob("detr-*.onnx"))
    assert len(exports) == 1  # next to the checkpoint, keyed by the weights' hash
    printed = capsys.readouterr().out
    assert printed.count("exporting the model once") == 1
    assert printed.count(f"using the cached export {exports[0]}") == 1


def test_onnxruntime_backend_refuses_what_it_does_not_cover(tmp_path):
    _tiny_checkpoint(tmp_path / "box.pth")
    _tiny_checkpoint(tmp_path / "masks.pth", ["--masks", "--hidden_dim", "128", "--nheads", "8"])
    Image.new("RGB", (64, 48)).save(tmp_path / "one.png")
    for checkpoint, extra in (("box.pth", ["--no_fuse"]), ("masks.pth", [])):
        with pytest.raises(SystemExit, match="onnxruntime runs the folded box model on the CPU"):
            predict.main(["--resume", str(tmp_path / checkpoint), "--img_dirs", str(tmp_path / "one.png"),
                          "--output_dir", str(tmp_path / "out"), "--device", "cpu",
                          "--inference_backend", "onnxruntime", *extra])
    assert not list(tmp_path.glob("*.onnx"))


def test_aspect_ratio_groups_batch_alike_pictures_and_keep_file_order(tmp_path):
    """Landscape and portrait pictures alternate in file order; grouped batches of 2 pair equal
    shapes (no padding), so every picture gets what it gets alone (batch 1), ids in file order."""
    _tiny_checkpoint(tmp_path / "ckpt.pth")
    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(60, 100), (100, 60), (60, 100), (100, 60)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    _exif_rotated(tmp_path / "rotated.jpg")  # stored 20x40, displayed 40x20: the widest
    assert aspect_ratio_order([*sorted(folder.iterdir()), tmp_path / "rotated.jpg"]) == [4, 0, 2, 1, 3]
    found = {}
    for mode, extra in (("alone", ["--batch_size", "1"]), ("grouped", ["--batch_size", "2"])):
        predict.main(["--resume", str(tmp_path / "ckpt.pth"), "--img_dirs", str(folder), "--output_dir",
                      str(tmp_path / mode), "--threshold", "0", "--device", "cpu", *extra])
        found[mode] = json.loads((tmp_path / mode / "predictions.json").read_text())
        images = json.loads((tmp_path / mode / "images.json").read_text())["images"]
        assert [im["file_name"] for im in images] == [f"pics/{i}.png" for i in range(4)]
    _same_detections(found["grouped"], found["alone"])


def test_explicit_shape_flag_wins_and_a_wrong_one_is_a_clear_error(tmp_path):
    _tiny_checkpoint(tmp_path / "ckpt.pth")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "one.png")
    with pytest.raises(SystemExit, match=r"query_embed.weight.*\n.*hint: checkpoint has 10 queries, model 12"):
        predict.main(["--resume", str(tmp_path / "ckpt.pth"), "--img_dirs", str(tmp_path / "one.png"),
                      "--output_dir", str(tmp_path / "out"), "--num_queries", "12"])


def test_mask_model_draws_masks(tmp_path):
    _tiny_checkpoint(tmp_path / "ckpt.pth", ["--masks", "--hidden_dim", "128", "--nheads", "8"])
    grey = Image.new("RGB", (64, 48), (128, 128, 128))
    grey.save(tmp_path / "grey.png")
    out = tmp_path / "out"
    summary = predict.main(["--resume", str(tmp_path / "ckpt.pth"), "--img_dirs", str(tmp_path / "grey.png"),
                            "--output_dir", str(out), "--threshold", "0"])
    assert summary["detections"] == 10
    drawn = np.asarray(Image.open(out / "pictures" / "grey.png.png").convert("RGB"), dtype=int)
    # The same boxes and labels drawn without masks: any difference is the masks' tint.
    predictions = json.loads((out / "predictions.json").read_text())
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in predictions)])
    labels = [f"{p['category_name']} {p['score']:.2f}" for p in predictions]
    boxes_only = draw_enlarged(grey, boxes, labels, [p["category_id"] for p in predictions],
                                       scores=[p["score"] for p in predictions])
    assert drawn.shape == (48 * 8, 64 * 8, 3)  # 64 px wide: enlarged 8x to reach 512
    assert (np.abs(drawn - np.asarray(boxes_only, dtype=int)).sum(-1) > 0).mean() > 0.05


# ---------------------------------------------------------------------------------------------
# Drawing: order, labels inside the picture


def _label_run(picture: Image.Image, colour: tuple[int, int, int], row: int) -> tuple[int, int]:
    """First and last column of `colour` in `row` (a label's background)."""
    columns = np.flatnonzero((np.asarray(picture)[row] == colour).all(-1))
    return int(columns.min()), int(columns.max())


@pytest.mark.parametrize("given_order", [[0.75, 0.98], [0.98, 0.75]])
def test_highest_score_label_is_drawn_on_top(given_order):
    white = Image.new("RGB", (128, 96), (255, 255, 255))
    # Two boxes from the same corner: their labels cover the same place.
    boxes = torch.tensor([[10.0, 30.0, 60.0, 80.0], [10.0, 30.0, 70.0, 90.0]])
    category_ids = [1 if score == 0.98 else 2 for score in given_order]
    labels = [f"c{c} {s:.2f}" for c, s in zip(category_ids, given_order)]
    drawn = draw_detections(white, boxes, labels, category_ids, scores=given_order)
    corner = drawn.getpixel(place_label(boxes[0].tolist(), (10, 10), drawn.size))
    assert corner == colour_for(1)  # the 0.98 detection's label, whatever the input order


def test_labels_stay_inside_the_picture():
    assert place_label([120.0, 50.0, 128.0, 60.0], (40, 12), (128, 96)) == (88, 38)  # moved left
    assert place_label([5.0, 3.0, 50.0, 40.0], (40, 12), (128, 96)) == (5, 3)  # no room above: inside
    assert place_label([-9.0, 90.0, 20.0, 99.0], (40, 12), (128, 96)) == (0, 78)  # off the picture
    # Drawn: the label at the right edge is complete, as wide as the same label in open space.
    label, colour = ["rectangle 0.98"], colour_for(3)
    edge = draw_detections(Image.new("RGB", (128, 96), (255, 255, 255)),
                                   torch.tensor([[110.0, 40.0, 127.0, 60.0]]), label, [3], scores=[0.98])
    room = draw_detections(Image.new("RGB", (128, 96), (255, 255, 255)),
                                   torch.tensor([[2.0, 40.0, 20.0, 60.0]]), label, [3], scores=[0.98])
    first, last = _label_run(edge, colour, 30)
    assert last == 127 and last - first == np.subtract(*_label_run(room, colour, 30)[::-1])


def test_small_pictures_are_enlarged_for_drawing_only():
    assert drawing_scale((128, 100)) == 4 and drawing_scale((1000, 600)) == 1
    picture = Image.new("RGB", (128, 96), (255, 255, 255))
    boxes = torch.tensor([[16.0, 20.0, 64.0, 60.0]])
    drawn = draw_enlarged(picture, boxes, ["a 0.90"], [1], scores=[0.9])
    assert drawn.size == (512, 384)
    # the outline sits at the box's corner times 4; boxes passed in stay in the picture's pixels
    assert drawn.getpixel((16 * 4 + 10, 60 * 4)) == colour_for(1)
    assert boxes.tolist() == [[16.0, 20.0, 64.0, 60.0]]
