"""The command lines as a new user meets them: a user error is one line `error: ...` on stderr and
exit status 2 (no traceback); a real bug keeps its traceback; every flag has help text, shown
with its default and in the original's groups; the run prints its flags as `name: value` lines."""
import argparse
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._utils import ExceptionWrapper

import main
import predict
import run_with_submitit
from util.checkpoint import CheckpointError
from util.cli import exit_on_user_error, user_error_message

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import export  # noqa: E402
import visualize_attention  # noqa: E402


def _run(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _one_line_user_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a user error (asserting status 2 and no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def run_script(monkeypatch, capsys):
    """Run a script's `__main__` block in this process (no interpreter start-up); returns the
    single stderr line of a user error, asserting exit status 2. Anything else raised propagates."""
    def run(script: str, *argv: str) -> str:
        monkeypatch.setattr(sys, "argv", [script, *argv])
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]
    return run


# ---------------------------------------------------------------------------------------------
# User errors: one line, status 2


def test_missing_coco_path_is_one_line(tmp_path):
    line = _one_line_user_error(_run("main.py", "--coco_path", str(tmp_path / "nonexistent"), "--device", "cpu"))
    assert line == f"error: --coco_path {tmp_path / 'nonexistent'} does not exist"


def test_default_device_without_cuda_is_one_line(tmp_path, run_script):
    # The default --device is the original's cuda; a CPU machine says so and how to fix it.
    line = run_script("main.py", "--coco_path", str(tmp_path / "nonexistent"))
    if torch.cuda.is_available():
        assert "--coco_path" in line
    else:
        assert line == "error: --device cuda: CUDA is not available on this machine; pass --device cpu"
    assert run_script("main.py", "--device", "gpu").startswith("error: --device gpu: not a device name")


def test_bad_json_and_bad_flag_combination_are_one_line(tmp_path, run_script):
    (tmp_path / "images").mkdir()
    (tmp_path / "ann.json").write_text('{"images": [')
    custom = ["--dataset_file", "custom", "--train_images", str(tmp_path / "images"), "--val_images",
              str(tmp_path / "images"), "--train_annotations", str(tmp_path / "ann.json"),
              "--val_annotations", str(tmp_path / "ann.json"), "--device", "cpu"]
    line = run_script("main.py", *custom)
    assert f"annotation file {tmp_path / 'ann.json'} is not valid JSON" in line
    line = run_script("main.py", *custom, "--resume", "a.pth", "--finetune", "b.pth")
    assert "--resume" in line and "--finetune" in line


def test_refused_checkpoint_is_one_line(tmp_path, run_script):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    line = run_script("main.py", "--dataset_file", "shapes", "--data_path", str(tmp_path / "shapes"),
                      "--shapes_train_size", "2", "--shapes_val_size", "1", "--shapes_image_size", "32",
                      "--device", "cpu", "--backbone", "resnet18", "--resume", str(tmp_path / "broken.pth"))
    assert "broken.pth" in line


def test_predict_missing_folder_is_one_line(tmp_path, run_script):
    torch.save({"model": {}}, tmp_path / "ckpt.pth")
    line = run_script("predict.py", "--resume", str(tmp_path / "ckpt.pth"), "--img_dirs", str(tmp_path / "nowhere"),
                      "--device", "cpu")
    assert line == f"error: --img_dirs: {tmp_path / 'nowhere'} does not exist"


# ---------------------------------------------------------------------------------------------
# What counts as a user error


def _raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:  # noqa: BLE001 - the test needs the traceback attached
        return caught


def test_project_errors_are_user_errors_library_errors_are_bugs():
    assert user_error_message(_raised(ValueError("--lr must be > 0"))) == "--lr must be > 0"
    assert user_error_message(_raised(FileNotFoundError("no such file: x.json"))) == "no such file: x.json"
    assert user_error_message(_raised(CheckpointError("x.pth: not a checkpoint"))) == "x.pth: not a checkpoint"
    assert user_error_message(_raised(SystemExit("--img_dirs: d does not exist"))) == "--img_dirs: d does not exist"
    assert user_error_message(_raised(SystemExit(0))) is None
    assert user_error_message(_raised(RuntimeError("shape mismatch"))) is None  # a bug
    try:
        json.loads("{")  # a ValueError raised inside the standard library: not the user's
    except ValueError as err:
        assert user_error_message(err) is None
    try:
        torch.zeros(2).view(3)  # torch's own error
    except RuntimeError as err:
        assert user_error_message(err) is None


def test_dataloader_worker_errors_are_judged_where_the_worker_raised_them():
    def in_worker(error: Exception) -> Exception:
        try:
            raise error
        except Exception:  # noqa: BLE001
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        try:
            wrapped.reraise()
        except Exception as reraised:  # noqa: BLE001
            return reraised

    message = "unreadable image a.jpg: truncated; the file is damaged"
    assert user_error_message(in_worker(ValueError(message))) == message
    assert user_error_message(in_worker(KeyError("boxes"))) is None


def test_exit_on_user_error_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        with exit_on_user_error():
            raise FileNotFoundError("--coco_path /x does not exist")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: --coco_path /x does not exist\n"
    with pytest.raises(RuntimeError, match="a bug"):
        with exit_on_user_error():
            raise RuntimeError("a bug")


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("DETR_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad"):
        with exit_on_user_error():
            raise ValueError("bad")


# ---------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("make_parser", [main.get_args_parser, predict.get_args_parser, export.get_args_parser,
                                         run_with_submitit.get_args_parser, visualize_attention.get_args_parser])
def test_every_flag_has_help_in_a_named_group(make_parser):
    parser = make_parser()
    missing = [a.option_strings for a in parser._actions if not (a.help or "").strip()]
    assert missing == []
    grouped = {id(a) for group in parser._action_groups if group.title not in ("options", "positional arguments")
               for a in group._group_actions}
    ungrouped = [a.option_strings for a in parser._actions if id(a) not in grouped and a.dest != "help"]
    assert ungrouped == []


def test_help_shows_defaults_in_the_original_groups(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["main.py", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
    assert info.value.code == 0
    text = capsys.readouterr().out
    headings = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == ["options", "optimisation", "model", "model: backbone", "model: transformer",
                        "model: segmentation", "loss", "matcher (Hungarian matching costs)", "loss coefficients",
                        "faster convergence (training only: the inference model stays the plain DETR)",
                        "dataset", "run", "speed", "distributed"]
    flat = " ".join(text.split())
    assert "--lr LR AdamW learning rate outside the backbone (default: 0.0001)" in flat
    assert "--device DEVICE device for training/testing (cuda, cuda:N, cpu) (default: cuda)" in flat
    assert "--output_dir OUTPUT_DIR where to save; empty = save nothing (default: empty)" in flat
    # switches show no default: "(default: True)" after --no_aux_loss would read as "on"
    assert "(default: True)" not in flat and "(default: False)" not in flat


def test_flags_print_as_name_value_lines(capsys):
    args = main.get_args_parser().parse_args(["--lr", "0.001", "--device", "cpu"])
    main.print_flags(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "flags:" and len(lines) == 1 + len(vars(args))
    assert [line.split(":")[0].strip() for line in lines[1:]] == list(vars(args))
    values = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in lines[1:]}
    assert values["lr"] == "0.001" and values["device"] == "cpu" and values["output_dir"] == ""
    assert "Namespace(" not in "\n".join(lines)


def test_parent_parser_keeps_groups_for_other_scripts():
    child = argparse.ArgumentParser(parents=[main.get_args_parser()])
    assert {"model: transformer", "dataset", "run"} <= {g.title for g in child._action_groups}
    assert child.parse_args(["--enc_layers", "2"]).enc_layers == 2
