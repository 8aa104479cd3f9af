"""TensorBoard scalars: event files readable by EventAccumulator; log.txt conversion; no-op fallback."""
import json
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from util.tensorboard import COCO_STAT_NAMES, TensorboardWriter

COCO = [0.1 * i for i in range(12)]


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_writer_tags_steps_and_values(tmp_path):
    writer = TensorboardWriter(tmp_path / "tb")
    writer.add_scalars({"train_loss": 2.5, "train_lr": torch.tensor(1e-4), "test_coco_eval_bbox": COCO,
                        "note": "text", "test_dict": {"a": 1}}, step=0)
    writer.add_scalars({"train_loss": 1.5}, step=1)
    writer.add_scalars({"loss": 3.0}, step=40, prefix="iter")
    writer.close()
    scalars = _scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(0, 2.5), (1, 1.5)]
    assert scalars["train/lr"][0][1] == pytest.approx(1e-4)
    assert scalars["iter/loss"] == [(40, 3.0)]
    for i, name in enumerate(COCO_STAT_NAMES):
        assert scalars[f"test/coco_eval_bbox/{name}"][0][1] == pytest.approx(COCO[i])
    assert "test/coco_eval_bbox/AP50" in scalars and "test/coco_eval_bbox/AR_large" in scalars
    assert not any("note" in t or "dict" in t for t in scalars)
    assert len(scalars) == 3 + 12


def test_log_to_tensorboard_converts_log_txt(tmp_path, repo_root):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"train_loss": 3.0 - e, "test_coco_eval_bbox": [e / 10] * 12, "epoch": e,
                         "n_parameters": 1000}) for e in range(3)]
    (run / "log.txt").write_text("\n".join(lines[:2] + ["{broken"] + lines[2:]) + "\n")
    result = subprocess.run([sys.executable, str(repo_root / "tools" / "log_to_tensorboard.py"), str(run)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "line 3 is not JSON" in result.stderr
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    scalars = _scalars(run / "tensorboard")
    assert scalars["train/loss"] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [v for _, v in scalars["test/coco_eval_bbox/AP"]] == pytest.approx([0.0, 0.1, 0.2])


def test_without_tensorboard_the_writer_is_a_noop(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    writer = TensorboardWriter(tmp_path / "tb")
    writer.add_scalars({"train_loss": 1.0}, step=0)
    writer.close()
    assert not writer.enabled
    assert "tensorboard package is not installed" in capsys.readouterr().out
    assert not (tmp_path / "tb").exists()
