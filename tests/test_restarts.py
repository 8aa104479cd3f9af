"""Restarts that never lose a run: the refusal to overwrite one, --resume auto, submitit's requeue.

- A fresh training run (no --resume) into an --output_dir holding a checkpoint stops before any
  work, naming the folder and both ways on; the files stay byte-identical. --overwrite starts afresh.
- --resume auto: the folder's checkpoint.pth when there is one, else a fresh start.
- run_with_submitit.py's requeue sets --resume auto (one way to resume, not two).
The torchrun restart (a rank killed mid-run, torchrun --max_restarts 1) is in test_torchrun_restart.py.
"""
import argparse
import json

import pytest

import main
import run_with_submitit
from util.checkpoint import CheckpointError, load_checkpoint, resume_source

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "8", "--image_scale", "0.16",
        "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "4", "--shapes_val_size", "2",
        "--batch_size", "2", "--print_freq", "100", "--eval_every", "0", "--num_workers", "0"]


def _main(tmp_path, out, *extra):
    return main.main(main.get_args_parser().parse_args(
        [*TINY, "--data_path", str(tmp_path / "shapes"), "--output_dir", str(out), *extra]))


def _logged_epochs(out):
    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines() if line.strip()]


def test_refusal_resume_auto_and_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    _main(tmp_path, out, "--epochs", "1", "--resume", "auto")  # empty folder: a fresh start
    assert "--resume auto: no checkpoint in --output_dir, starting fresh" in capsys.readouterr().out
    assert _logged_epochs(out) == [0]
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pth", "log.txt")}

    # Re-running the same command after a crash: refused, nothing touched.
    with pytest.raises(CheckpointError) as err:
        _main(tmp_path, out, "--epochs", "2")
    message = str(err.value)
    assert str(out) in message and "--resume auto" in message and "another --output_dir" in message
    assert "checkpoint.pth" in message and "\n" not in message
    assert {name: (out / name).read_bytes() for name in before} == before

    _main(tmp_path, out, "--epochs", "2", "--resume", "auto")  # continues at epoch 1
    assert f"--resume auto: resuming from {out / 'checkpoint.pth'}" in capsys.readouterr().out
    assert _logged_epochs(out) == [0, 1]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1

    (out / "checkpoint_best.pth").write_bytes(b"the old run's best")
    _main(tmp_path, out, "--epochs", "1", "--overwrite")  # deliberately afresh
    assert _logged_epochs(out) == [0]
    assert not (out / "checkpoint_best.pth").exists()  # no evaluation in this run: no best of it
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0


def test_finetune_with_resume_auto_starts_then_continues(tmp_path, capsys):
    """One command for a preemptible fine-tuning job: the first start fine-tunes, a restart resumes."""
    source = tmp_path / "source"
    _main(tmp_path, source, "--epochs", "1")
    out = tmp_path / "tuned"
    command = ["--finetune", str(source / "checkpoint.pth"), "--resume", "auto"]
    _main(tmp_path, out, "--epochs", "1", *command)
    printed = capsys.readouterr().out
    assert "--resume auto: no checkpoint in --output_dir, starting fresh" in printed
    assert f"--finetune {source / 'checkpoint.pth'}: every tensor loaded from the checkpoint" in printed
    _main(tmp_path, out, "--epochs", "2", *command)
    printed = capsys.readouterr().out
    assert f"--finetune {source / 'checkpoint.pth'} ignored: the run it started continues from" in printed
    assert _logged_epochs(out) == [0, 1]
    with pytest.raises(ValueError, match="give one of them"):  # an explicit checkpoint and --finetune clash
        _main(tmp_path, out, "--epochs", "3", "--finetune", str(source / "checkpoint.pth"),
              "--resume", str(out / "checkpoint.pth"))


def test_resume_source_rules(tmp_path):
    assert resume_source("", tmp_path) == ""  # empty folder: fresh run allowed
    assert resume_source("auto", tmp_path) == ""
    (tmp_path / "checkpoint0099.pth").write_bytes(b"")  # any checkpoint counts as a run
    with pytest.raises(CheckpointError, match="checkpoint0099.pth"):
        resume_source("", tmp_path)
    assert resume_source("", tmp_path, overwrite=True) == ""
    assert resume_source("", tmp_path, training=False) == ""  # --eval writes eval.pth only
    assert resume_source("other.pth", tmp_path) == "other.pth"  # an explicit --resume is the user's choice
    assert resume_source("", None) == ""  # no --output_dir: nothing is saved
    with pytest.raises(CheckpointError, match="give --output_dir"):
        resume_source("auto", None)
    (tmp_path / "checkpoint.pth").write_bytes(b"half")  # damaged outside the program: never silently afresh
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resume_source("auto", tmp_path)


@pytest.mark.parametrize("given, has_checkpoint, expected", [
    ("", False, "auto"), ("", True, "auto"), ("init.pth", False, "init.pth"), ("init.pth", True, "auto")])
def test_submitit_requeue_resumes_through_resume_auto(tmp_path, given, has_checkpoint, expected):
    if has_checkpoint:
        (tmp_path / "checkpoint.pth").write_bytes(b"x")
    args = argparse.Namespace(output_dir=str(tmp_path), resume=given)
    requeued = run_with_submitit.Trainer(args).checkpoint()
    assert requeued.function.args.resume == expected
