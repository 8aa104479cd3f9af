"""End-to-end faults through main.py: wrong checkpoint, bad output_dir, disk full, non-finite loss.

One tiny 1-epoch run (module fixture) provides a real checkpoint; each fault then runs main.main
again (in this process, to spare the start-up cost; one case goes through the command line to
check what a user sees) and checks the message and that the last good checkpoint is untouched.
"""
import argparse
import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
import main
from models import criterion
from util.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "10", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "4",
        "--shapes_val_size", "2", "--batch_size", "2", "--lr_drop", "1000", "--lr_backbone", "0"]


def _main(argv: list[str]):
    parser = argparse.ArgumentParser(parents=[main.get_args_parser()])
    return main.main(parser.parse_args([*TINY, *argv]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Output directory of a finished 1-epoch run (checkpoint.pth at epoch 0)."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "out"
    _main(["--data_path", str(tmp / "shapes"), "--epochs", "1", "--output_dir", str(out)])
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ["checkpoint.pth", "log.txt"]:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _resume_args(trained: Path, out: Path) -> list[str]:
    return ["--data_path", str(trained.parent / "shapes"), "--epochs", "2", "--output_dir", str(out),
            "--resume", str(out / "checkpoint.pth")]


def _logged_epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines() if line.strip()]


def test_checkpoint_for_another_class_count_through_the_command_line(trained, tmp_path):
    checkpoint = load_checkpoint(trained / "checkpoint.pth")
    width = checkpoint["model"]["class_embed.weight"].shape[1]
    checkpoint["model"]["class_embed.weight"] = torch.zeros(92, width)  # as a COCO (91 classes) checkpoint
    checkpoint["model"]["class_embed.bias"] = torch.zeros(92)
    torch.save(checkpoint, tmp_path / "coco91.pth")
    result = subprocess.run(
        [sys.executable, "main.py", *TINY, "--data_path", str(trained.parent / "shapes"), "--epochs", "2",
         "--output_dir", str(tmp_path / "out"), "--resume", str(tmp_path / "coco91.pth")],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2  # a user error: one message, exit status 2
    assert "coco91.pth" in result.stderr, result.stderr[-3000:]
    assert f"class_embed.weight: checkpoint [92, {width}] vs model [" in result.stderr
    assert "checkpoint for 91 classes" in result.stderr and "--finetune" in result.stderr
    assert "Traceback" not in result.stderr  # the message, not a library's stack


def test_checkpoint_for_another_architecture(trained, tmp_path):
    out = _copy_run(trained, tmp_path / "out")
    with pytest.raises(CheckpointError) as info:
        _main([*_resume_args(trained, out), "--enc_layers", "2"])  # argparse: the last --enc_layers wins
    message = str(info.value)
    assert "checkpoint.pth" in message
    assert "missing keys" in message and "transformer.encoder.layers.1." in message
    assert "--enc_layers/--dec_layers" in message


def test_unwritable_output_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"  # a path below a regular file cannot be created, even by root
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"a_file/run cannot be used"):
        _main(["--data_path", str(tmp_path / "shapes"), "--epochs", "1", "--output_dir", str(blocker / "run")])
    assert "Epoch: [0]" not in capsys.readouterr().out  # no training step was spent
    assert not (tmp_path / "shapes").exists()  # not even the data was prepared


def test_disk_full_while_saving_keeps_last_checkpoint(trained, tmp_path, monkeypatch):
    out = _copy_run(trained, tmp_path / "out")
    before = (out / "checkpoint.pth").read_bytes()
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if ".checkpoint.pth.tmp" in str(getattr(f, "name", "")):
            f.write(b"PK\x03\x04" + bytes(4096))  # some bytes reach the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(CheckpointError) as info:
        _main(_resume_args(trained, out))
    message = str(info.value)
    assert "disk full" in message and str(out / "checkpoint.pth") in message and "left intact" in message
    assert (out / "checkpoint.pth").read_bytes() == before
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == []


def test_non_finite_loss_stops_with_details_and_keeps_checkpoint(trained, tmp_path, monkeypatch):
    out = _copy_run(trained, tmp_path / "out")
    before = (out / "checkpoint.pth").read_bytes()
    real_forward = criterion.SetCriterion.forward
    calls = []

    def nan_on_second_batch(self, outputs, targets, *args, **kwargs):
        losses = real_forward(self, outputs, targets, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            losses["loss_ce"] = losses["loss_ce"] * float("nan")
        return losses

    monkeypatch.setattr(criterion.SetCriterion, "forward", nan_on_second_batch)
    with pytest.raises(engine.NonFiniteLossError) as info:
        _main(_resume_args(trained, out))
    message = str(info.value)
    assert "epoch 1" in message and "iteration 1" in message, message
    assert "loss_ce" in message and "nan" in message.lower()
    assert re.search(r"image ids of the batch: \[\d+, \d+\]", message), message  # batch_size 2
    assert (out / "checkpoint.pth").read_bytes() == before
    assert _logged_epochs(out) == [0]
