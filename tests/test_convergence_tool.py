"""tools/convergence.py: training seconds and AP50 read from a run, the score at the time budget,
the held-out summary, and the harness end to end in its tiny mode."""
import json
import subprocess
import sys

import pytest

from tools import convergence

CONSOLE = """flags: ...
Epoch: [0]  [ 0/50]  eta: 0:00:10  loss: 9.0  time: 0.2000
Epoch: [0]  [49/50]  eta: 0:00:00  loss: 8.0  time: 0.2000
Epoch: [0] Total time: 0:00:10 (0.2000 s / it)
Test:  [0/16]  eta: 0:00:03  time: 0.2
Test: Total time: 0:00:03 (0.2000 s / it)
Epoch: [1]  [ 0/50]  eta: 0:00:10  loss: 7.0  time: 0.3000
Epoch: [1] Total time: 0:00:15 (0.3000 s / it)
Epoch: [2]  [ 0/50]  eta: 0:00:10  loss: 6.0  time: 0.2000
Epoch: [2] Total time: 0:00:10 (0.2000 s / it)
"""


def _run_dir(tmp_path, ap50s, ema=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "console.txt").write_text(CONSOLE)
    rows = []
    for epoch, ap50 in enumerate(ap50s):
        row = {"epoch": epoch, "test_coco_eval_bbox": [ap50 / 2, ap50] + [0.0] * 10}
        if ema:
            row["test_ema_coco_eval_bbox"] = [0.0, ap50 + 0.01] + [0.0] * 10
        rows.append(json.dumps(row))
    (tmp_path / "log.txt").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_curve_counts_training_seconds_only_and_the_budget_takes_the_last_evaluation_within_it(tmp_path):
    curve = convergence.read_curve(_run_dir(tmp_path, [0.1, 0.4, 0.6], ema=True))
    assert [p["train_s"] for p in curve] == [10.0, 25.0, 35.0]  # 50 it x 0.2 s, + 50 x 0.3, + 50 x 0.2
    assert [p["ap50"] for p in curve] == [0.1, 0.4, 0.6] and curve[1]["ema_ap50"] == pytest.approx(0.41)
    assert convergence.at_budget(curve, 9.9) == 0.0
    assert convergence.at_budget(curve, 10.0) == 0.1
    assert convergence.at_budget(curve, 34.9) == 0.4
    assert convergence.at_budget(curve, 1e9) == 0.6
    assert convergence.at_budget([{"train_s": 1.0, "ap50": -1.0}], 5) == 0.0  # COCO's -1 (nothing to score)


def test_summary_has_the_held_out_mean_and_worst_case(tmp_path):
    results = {"plain": {
        "demo": {0: convergence.read_curve(_run_dir(tmp_path / "a", [0.2, 0.9, 0.9]))},
        "random_colours": {0: convergence.read_curve(_run_dir(tmp_path / "b", [0.1, 0.3, 0.5])),
                           1: convergence.read_curve(_run_dir(tmp_path / "c", [0.1, 0.5, 0.7]))},
        "boxes_only": {0: convergence.read_curve(_run_dir(tmp_path / "d", [0.0, 0.2, 0.3]))}}}
    summary = convergence.summarise("scratch", results, budget=30)
    plain = summary["plain"]
    assert plain["variants"]["demo"] == {"split": "tune", "mean": 0.9, "per_seed": [0.9]}
    assert plain["variants"]["random_colours"]["mean"] == pytest.approx(0.4)
    assert plain["held_out_mean"] == pytest.approx(0.3)  # the tune variant stays out of it
    assert plain["held_out_worst"] == ("boxes_only", 0.2)
    text = convergence.table("scratch", summary, 30)
    assert "| plain | 0.900 | 0.400 | 0.200 | 0.300 | 0.200 (boxes_only) |" in text
    curves = convergence.curve_table("scratch", results, 40)
    assert "| plain | random_colours | 0.100 | 0.100 | 0.400 | 0.600 |" in curves  # 10, 20, 30, 40 s


def test_unknown_recipe_or_variant_is_named(capsys):
    with pytest.raises(SystemExit):
        convergence.parse_args(["--scenario", "finetune", "--variants", "demo"])
    assert "--variants demo: not a finetune variant" in capsys.readouterr().err


def test_tiny_harness_stops_at_the_budget_and_writes_table_and_json(tmp_path, repo_root):
    command = [sys.executable, "tools/convergence.py", "--tiny", "--scenario", "scratch", "--recipes", "plain",
               "--variants", "boxes_only", "--seeds", "0", "--budget", "0.001",
               "--data_root", str(tmp_path / "data"), "--out_root", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stopped: training time passed the 0 s budget" in result.stdout
    assert "| plain | 0.000 | 0.000 | 0.000 (boxes_only) |" in result.stdout
    report = json.loads((tmp_path / "out" / "scratch.json").read_text())
    assert report["budget_s"] == 0.001 and report["summary"]["plain"]["held_out_worst"] == ["boxes_only", 0.0]
    console = (tmp_path / "out" / "scratch" / "plain" / "boxes_only" / "s0" / "console.txt").read_text()
    assert "Epoch: [0] Total time" in console and "Epoch: [1] Total time" not in console  # stopped, 2 epochs asked
    annotations = json.loads((tmp_path / "data" / "boxes_only_tiny_s0" / "annotations" /
                              "instances_train2017.json").read_text())["annotations"]
    assert annotations and not any("segmentation" in a for a in annotations)


@pytest.mark.slow
def test_tiny_finetune_scenario_trains_a_base_then_fine_tunes_to_new_ids(tmp_path, repo_root):
    command = [sys.executable, "tools/convergence.py", "--tiny", "--scenario", "finetune", "--seeds", "0",
               "--budget", "600", "--data_root", str(tmp_path / "data"), "--out_root", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "out" / "finetune" / "base" / "s0" / "checkpoint.pth").is_file()
    report = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert set(report["summary"]) == set(convergence.RECIPES["finetune"])
    for recipe in report["runs"].values():
        assert set(recipe) == set(convergence.TINY_VARIANTS["finetune"])
        assert all(len(curve) == 2 for seeds in recipe.values() for curve in seeds.values())  # 2 epochs each
