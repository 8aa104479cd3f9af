"""Flag values that make no sense are refused before any work: one line naming the flag and the
allowed range, exit status 2, the run folder untouched; the documented edge values stay allowed and
every default is a valid value of its own flag."""
import subprocess
import sys
from pathlib import Path

import pytest

import main
import predict
import run_with_submitit
from tools import export, visualize_attention
from util.flag_types import parse_flags

ROOT = Path(__file__).resolve().parents[1]


def _refusals(commands: list[list[str]]) -> list[str]:
    """Run the commands side by side; assert each exits 2 with one `error: ` line and no traceback;
    return those lines."""
    running = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for argv in commands]
    lines = []
    for argv, process in zip(commands, running):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, (argv, err[-2000:])
        assert "Traceback" not in err and "Start training" not in out, (argv, err[-2000:])
        stderr = err.strip().splitlines()
        assert len(stderr) == 1 and stderr[0].startswith("error: "), (argv, stderr)
        lines.append(stderr[0])
    return lines


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run folder as a previous run left it."""
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("checkpoint.pth", "checkpoint_best.pth", "checkpoint_ema.pth"):
        (folder / name).write_bytes(b"weights of " + name.encode())
    (folder / "log.txt").write_text('{"epoch": 0, "train_loss": 1.5}\n')
    return folder


def test_main_refuses_nonsense_values_and_contradictions_before_any_work(run_folder):
    before = _snapshot(run_folder)
    common = ["main.py", "--device", "cpu", "--dataset_file", "shapes", "--data_path", str(run_folder / "shapes"),
              "--output_dir", str(run_folder)]
    lines = _refusals([[*common, "--batch_size", "0"], [*common, "--lr", "-1"],
                       [*common, "--resume", "auto", "--overwrite"], [*common, "--epochs", "0"]])
    assert lines[:2] == ["error: argument --batch_size: must be an integer >= 1, got 0",
                         "error: argument --lr: must be a number > 0, got -1"]
    assert lines[2] == ("error: --resume auto continues the run in --output_dir, --overwrite starts it afresh: "
                        "give one of them")
    assert lines[3] == "error: --epochs 0 trains nothing: give --epochs 1 or more, or --eval to evaluate"
    assert _snapshot(run_folder) == before  # --overwrite did not delete checkpoint_best.pth / _ema.pth
    assert not (run_folder / "shapes").exists()  # no data generated


def test_predict_refuses_threshold_and_batch_size_before_any_work(tmp_path):
    out = tmp_path / "out"
    (out / "pictures").mkdir(parents=True)
    (out / "predictions.json").write_text("[]")
    before = _snapshot(out)
    base = ["predict.py", "--resume", str(tmp_path / "missing.pth"), "--img_dirs", str(tmp_path),
            "--output_dir", str(out), "--device", "cpu"]
    lines = _refusals([[*base, "--threshold", "1"], [*base, "--batch_size", "0"]])
    assert lines == ["error: argument --threshold: must be a number >= 0 and < 1, got 1",
                     "error: argument --batch_size: must be an integer >= 1, got 0"]
    assert _snapshot(out) == before


# The same checks, in this process: every range flag of every script.
REFUSED = {
    main.get_args_parser: [("--lr", "0"), ("--batch_size", "-2"), ("--grad_accum_steps", "0"),
                           ("--weight_decay", "-0.0001"), ("--epochs", "-1"), ("--lr_drop", "0"),
                           ("--clip_max_norm", "-0.1"), ("--num_classes", "0"), ("--enc_layers", "-1"),
                           ("--dec_layers", "0"), ("--dim_feedforward", "0"), ("--hidden_dim", "0"),
                           ("--nheads", "0"), ("--num_queries", "-5"), ("--dropout", "-0.1"), ("--group_detr", "0"),
                           ("--ema", "1"), ("--mosaic", "1.5"), ("--box_paste", "-1"), ("--head_lr_mult", "0"),
                           ("--set_cost_class", "-1"), ("--eos_coef", "-0.1"), ("--shapes_train_size", "0"),
                           ("--image_scale", "0"), ("--copy_paste", "-1"), ("--num_workers", "-1"),
                           ("--seed", "-1"), ("--start_epoch", "-1"), ("--eval_every", "-1"), ("--print_freq", "-1"),
                           ("--tb_freq", "-1"), ("--world_size", "0"), ("--lr", "nan"), ("--batch_size", "two")],
    predict.get_args_parser: [("--threshold", "1.5"), ("--batch_size", "0"), ("--num_queries", "0")],
    visualize_attention.get_args_parser: [("--threshold", "-1"), ("--top_k", "0"), ("--max_side", "0")],
    run_with_submitit.get_args_parser: [("--ngpus", "0"), ("--nodes", "0"), ("--timeout", "0")],
}
REQUIRED = {predict.get_args_parser: ["--img_dirs", "x"], visualize_attention.get_args_parser: ["--image", "x"]}


@pytest.mark.parametrize("make_parser", list(REFUSED), ids=lambda make: make.__module__)
def test_every_range_flag_is_checked_while_parsing(make_parser):
    """The scripts parse with util.flag_types.parse_flags (the subprocess tests above show the line it gives)."""
    for flag, value in REFUSED[make_parser]:
        with pytest.raises(SystemExit) as info:
            parse_flags(make_parser(), [*REQUIRED.get(make_parser, []), flag, value])
        message = str(info.value.code)
        assert message.startswith(f"argument {flag}: must be "), (flag, message)
        assert message.endswith(f", got {value}"), message


def test_documented_edge_values_stay_allowed():
    args = parse_flags(main.get_args_parser(), ["--lr_backbone", "0", "--clip_max_norm", "0", "--eval_every", "0",
                                                "--epochs", "0", "--eval", "--num_workers", "0", "--ema", "0",
                                                "--seed", "0", "--dropout", "0", "--print_freq", "0",
                                                "--tb_freq", "0"])
    assert (args.lr_backbone, args.clip_max_norm, args.eval_every, args.epochs) == (0, 0, 0, 0)
    assert parse_flags(main.get_args_parser(), ["--lr_backbone", "-1"]).lr_backbone == -1  # freezes the backbone
    assert parse_flags(predict.get_args_parser(), ["--img_dirs", "x", "--threshold", "0"]).threshold == 0


@pytest.mark.parametrize("make_parser", [main.get_args_parser, predict.get_args_parser, export.get_args_parser,
                                         visualize_attention.get_args_parser, run_with_submitit.get_args_parser],
                         ids=lambda make: make.__module__)
def test_every_default_is_a_valid_value_of_its_flag(make_parser):
    checked = 0
    for action in make_parser()._actions:
        if callable(action.type) and action.default is not None:
            assert action.type(str(action.default)) == action.default, action.dest
            checked += 1
    assert checked >= 2


def test_main_defaults_are_the_originals():
    args = parse_flags(main.get_args_parser(), [])
    assert (args.lr, args.lr_backbone, args.batch_size, args.weight_decay, args.epochs, args.lr_drop) == \
        (1e-4, 1e-5, 2, 1e-4, 300, 200)
    assert (args.clip_max_norm, args.enc_layers, args.dec_layers, args.dim_feedforward, args.hidden_dim) == \
        (0.1, 6, 6, 2048, 256)
    assert (args.dropout, args.nheads, args.num_queries, args.eos_coef, args.num_workers, args.seed) == \
        (0.1, 8, 100, 0.1, 2, 42)
    assert not hasattr(args, "channels_last")  # the fast training path is channels_last already
