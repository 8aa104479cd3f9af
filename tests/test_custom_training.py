"""A researcher's own COCO export: category ids {0, 3, 7} or from 1 with gaps train, and predict.py names them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import predict
from util.checkpoint import load_checkpoint

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "10", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu", "--batch_size", "2"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]


def _write_split(folder: Path, json_path: Path, categories: dict[int, str], images: int, seed: int) -> None:
    """`images` pictures of coloured rectangles (one colour per category) and their COCO JSON."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    ids = sorted(categories)
    entries, annotations = [], []
    for image_id in range(1, images + 1):
        width, height = 112, 96
        picture = Image.new("RGB", (width, height), (235, 235, 235))
        draw = ImageDraw.Draw(picture)
        for k in range(2):
            which = int(torch.randint(len(ids), (1,), generator=generator))
            x, y = (int(v) for v in torch.randint(0, 50, (2,), generator=generator))
            w, h = (int(v) for v in torch.randint(20, 45, (2,), generator=generator))
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=COLOURS[which])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[which],
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        name = f"img{image_id:03d}.jpg"
        picture.save(folder / name, quality=95)
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
    json_path.write_text(json.dumps({"images": entries, "annotations": annotations,
                                     "categories": [{"id": i, "name": n} for i, n in categories.items()]}))


@pytest.mark.parametrize("categories", [
    {0: "red", 3: "green", 7: "blue"},
    {1: "red", 4: "green", 9: "blue"},
], ids=["ids_0_3_7", "ids_1_4_9"])
def test_custom_dataset_trains_and_predicts_named_ids(tmp_path, repo_root, categories):
    data = tmp_path / "data"
    _write_split(data / "train", data / "train.json", categories, images=4, seed=0)
    _write_split(data / "val", data / "val.json", categories, images=2, seed=1)
    run = tmp_path / "run"
    command = [sys.executable, str(repo_root / "main.py"), "--dataset_file", "custom",
               "--train_images", str(data / "train"), "--train_annotations", str(data / "train.json"),
               "--val_images", str(data / "val"), "--val_annotations", str(data / "val.json"),
               "--epochs", "1", "--output_dir", str(run), *TINY]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    checkpoint = load_checkpoint(run / "checkpoint.pth")
    largest = max(categories)
    assert checkpoint["model"]["class_embed.weight"].shape[0] == largest + 2  # max id + 1 classes + no-object
    assert checkpoint["args"].num_classes == largest + 1
    log = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
    assert log[-1]["epoch"] == 0 and "train_loss" in log[-1]
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    loss = accumulator.Scalars("train/loss")
    assert [e.step for e in loss] == [0] and loss[0].value == pytest.approx(log[-1]["train_loss"], rel=1e-5)
    assert "test/coco_eval_bbox/AP" in accumulator.Tags()["scalars"]

    out = tmp_path / "preds"
    summary = predict.main(["--resume", str(run / "checkpoint.pth"), "--img_dirs", str(data / "val"),
                            "--output_dir", str(out), "--threshold", "0"])
    assert summary["images"] == 2
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 2 * 10
    assert {p["category_id"] for p in predictions} <= set(categories)
    assert all(p["category_name"] == categories[p["category_id"]] for p in predictions)
    written = json.loads((out / "images.json").read_text())["categories"]
    assert {c["id"]: c["name"] for c in written} == categories
