"""predict.py reads each input picture once and writes one output per input: its output folder is
never read back as input (however often it runs), a folder or file given twice is predicted once,
and inputs that differ only in extension or parent folder get outputs that cannot collide; what is
skipped is printed with the reason."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main
from models import build_model
from util.pictures import list_pictures

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "4", "--image_scale", "0.1",
        "--num_classes", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    args = main.get_args_parser().parse_args(TINY)
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    torch.save({"model": model.state_dict(), "args": args}, path)
    return path


def _picture(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def _predict(checkpoint: Path, out: Path, *inputs: Path) -> tuple[str, dict]:
    """Run predict.py; returns its stdout and images.json."""
    result = subprocess.run([sys.executable, "predict.py", "--resume", str(checkpoint), "--img_dirs", *map(str, inputs),
                             "--output_dir", str(out), "--device", "cpu", "--threshold", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads((out / "images.json").read_text())


def _drawn(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out / "pictures")) for p in (out / "pictures").rglob("*") if p.is_file())


def test_output_folder_inside_the_input_folder_is_never_read_back(checkpoint, tmp_path):
    photos = tmp_path / "photos"
    _picture(photos / "a.jpg", (200, 30, 30))
    _picture(photos / "b.png", (30, 200, 30))
    out = photos / "predictions"
    for _ in range(2):  # the second run finds the first run's pictures under photos/predictions/pictures
        stdout, images = _predict(checkpoint, out, photos)
        assert [im["file_name"] for im in images["images"]] == ["photos/a.jpg", "photos/b.png"]
        assert _drawn(out) == ["photos/a.jpg.png", "photos/b.png.png"]  # nothing nested deeper
    assert f"skipping {out / 'pictures' / 'photos' / 'a.jpg.png'}: an output of this run ({out / 'pictures'})" in stdout
    assert f"skipping {out / 'images.json'}: an output of this run" in stdout
    assert "skipped 4 file(s)" in stdout  # the two drawn pictures and the two JSON files


def test_each_input_once_and_outputs_that_cannot_collide(checkpoint, tmp_path):
    x, y = tmp_path / "x" / "photos", tmp_path / "y" / "photos"
    _picture(x / "a.jpg", (200, 30, 30))
    _picture(x / "a.png", (30, 200, 30))  # same stem, other extension
    _picture(y / "a.jpg", (30, 30, 200))  # same folder name and file name, another folder
    out = tmp_path / "out"
    stdout, images = _predict(checkpoint, out, x, x, x / "a.png", y)  # x twice, and a file inside x
    names = [im["file_name"] for im in images["images"]]
    assert names == ["photos/a.jpg", "photos/a.png", "y/photos/a.jpg"]
    assert [im["id"] for im in images["images"]] == [1, 2, 3]
    assert _drawn(out) == ["photos/a.jpg.png", "photos/a.png.png", "y/photos/a.jpg.png"]
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted({p["file_name"] for p in predictions}) == sorted(names) and len(predictions) == 3 * 4
    assert stdout.count(": already listed as photos/a.jpg") == 1
    assert stdout.count(": already listed as photos/a.png") == 2  # from the second x and given directly


def test_listing_returns_what_it_skipped_and_why(tmp_path):
    _picture(tmp_path / "in" / "a.jpg", (1, 2, 3))
    _picture(tmp_path / "in" / "out" / "pictures" / "in" / "a.jpg.png", (1, 2, 3))
    (tmp_path / "in" / ".hidden.jpg").write_bytes(b"")
    found, skipped = list_pictures([str(tmp_path / "in"), str(tmp_path / "in" / "a.jpg")],
                                   [tmp_path / "in" / "out" / "pictures"])
    assert found == [(tmp_path / "in" / "a.jpg", "in/a.jpg")]
    assert [item["path"] for item in skipped] == [str(tmp_path / "in" / "out" / "pictures" / "in" / "a.jpg.png"),
                                                  str(tmp_path / "in" / "a.jpg")]
    assert skipped[0]["reason"] == f"an output of this run ({tmp_path / 'in' / 'out' / 'pictures'})"
    assert skipped[1]["reason"] == "already listed as in/a.jpg"
