"""Plot tools write PNGs: plot_logs, plot_precision_recall and tools/plot_run.py on a run directory."""
import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.plot_utils import load_eval, plot_logs, plot_precision_recall


def _coco_eval_dict() -> dict:
    """A real pycocotools evaluation: 2 images, 2 classes (one without ground truth), 2 detections."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([{"image_id": 1, "category_id": 1, "bbox": [11, 11, 30, 30], "score": 0.9},
                         {"image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 20], "score": 0.4}])
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    data = {k: evaluator.eval[k] for k in ("precision", "recall", "scores", "counts", "date")}
    # As main.py saves it: params as a plain dict, which still holds numpy scalars (image ids).
    data["params"] = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(evaluator.params).items()}
    data["params"]["imgIds"] = [np.int64(i) for i in data["params"]["imgIds"]]
    return data


def _make_run(root, name, epochs=3):
    run = root / name
    (run / "eval").mkdir(parents=True)
    lines = [{"train_loss": 3.0 - e, "train_class_error": 50.0 - e, "test_class_error": 60.0 - e,
              "train_loss_bbox_unscaled": 0.3, "test_loss_bbox_unscaled": 0.4,
              "test_coco_eval_bbox": [0.1 * e] * 12, "epoch": e} for e in range(epochs)]
    (run / "log.txt").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = _coco_eval_dict()
    torch.save(data, run / "eval" / "000.pth")
    torch.save({k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in data.items()},
               run / "eval" / "latest.pth")
    return run


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plot_logs_writes_png_and_plots_each_series(tmp_path):
    runs = [_make_run(tmp_path, "a"), _make_run(tmp_path, "b")]
    fig, axes = plot_logs(runs, out_file=tmp_path / "logs.png")
    assert _png_size(tmp_path / "logs.png") == (1200, 400)
    # class_error and loss_bbox_unscaled: train + test per run; mAP: one line per run.
    assert [len(ax.lines) for ax in axes] == [4, 4, 2]
    assert list(axes[2].lines[0].get_ydata()) == pytest.approx([0.0, 0.1, 0.2])


def test_plot_logs_names_a_missing_log(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="log.txt does not exist"):
        plot_logs(tmp_path / "empty")


def test_plot_precision_recall_ignores_classes_without_ground_truth(tmp_path, capsys):
    run = _make_run(tmp_path, "a")
    fig, axes = plot_precision_recall([run / "eval" / "000.pth", run / "eval" / "latest.pth"],
                                      out_file=tmp_path / "pr.png")
    assert _png_size(tmp_path / "pr.png") == (1000, 400)
    precision = axes[0].lines[0].get_ydata()
    # Class 1 is found exactly at score 0.9 for 1 of its 2 boxes: precision 1 up to recall 0.5.
    assert precision[:51] == pytest.approx(np.ones(51))
    assert np.all(precision[51:] == 0)
    assert np.array_equal(axes[1].lines[1].get_ydata(), axes[1].lines[0].get_ydata())
    assert "000: mAP@50=" in capsys.readouterr().out
    assert load_eval(run / "eval" / "latest.pth")["precision"].shape == (10, 101, 2, 4, 3)


def test_plot_run_script_writes_both_pngs(tmp_path, repo_root):
    run = _make_run(tmp_path, "run")
    result = subprocess.run([sys.executable, str(repo_root / "tools" / "plot_run.py"), str(run)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _png_size(run / "plots" / "curves.png")[0] > 0
    assert _png_size(run / "plots" / "precision_recall.png")[0] > 0
