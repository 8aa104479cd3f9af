"""With every convergence flag at its default (--group_detr 1, no EMA), training is
bit-identical to the code before those flags existed.

The run uses --no_fast_train: the default fast training path (fast.optimize_for_training:
frozen BatchNorm inside its convolution, channels_last) is another summation order by design and
is held to the plain path's loss within 1e-5 by tests/test_fast_paths.py and test_main_e2e.py.

tests/data/default_run_digest.json holds, per CPU kind, the sha256 of every tensor of a 2-epoch
tiny run's checkpoint (model and optimizer state) written by the code before the flags landed
(commit f18195c, run on that CPU). Floating-point kernels differ between CPU generations, so a
digest is only comparable on the CPU kind it was recorded on; on another the test skips, naming them.
Add this CPU kind: run `python tests/test_default_bit_identity.py` in a checkout of f18195c and
`--add` its entry here. Regenerate (only when a change is *meant* to alter default numbers; it drops
the other kinds' entries): `python tests/test_default_bit_identity.py --regenerate`.
"""
import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import main  # noqa: E402
from benchmarks.common import cpu_model  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "default_run_digest.json"
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--num_queries", "8", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "8",
        "--shapes_val_size", "2", "--batch_size", "2", "--print_freq", "100", "--epochs", "2", "--lr_drop", "1",
        "--eval_every", "0", "--no_fast_train"]


def _machine() -> dict:
    return {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def _digest(state: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        elif isinstance(value, dict):
            out.update(_digest(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out.update(_digest(dict(enumerate(value)), f"{name}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = repr(value)
    return out


def run_digest(data_path: Path, out: Path, extra: list = ()) -> dict:
    """Train the tiny model 2 epochs with one thread (reduction order fixed) and digest checkpoint.pth."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = main.get_args_parser().parse_args([*TINY, "--data_path", str(data_path), "--output_dir", str(out),
                                                  *extra])
        main.main(args)
    finally:
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(out / "checkpoint.pth")
    return {**_digest(ckpt["model"], "model."), **_digest(ckpt["optimizer"], "optimizer.")}


def references() -> list[dict]:
    """[{machine, digest}] of tests/data/default_run_digest.json, one per CPU kind."""
    return json.loads(REFERENCE.read_text())["references"]


def test_default_flags_reproduce_the_reference_bit_for_bit(tmp_path):
    mine = [r for r in references() if r["machine"] == _machine()]
    if not mine:
        pytest.skip(f"reference digests were recorded on {[r['machine'] for r in references()]}, this machine is "
                    f"{_machine()}: float kernels differ between CPUs")
    reference = mine[0]
    digest = run_digest(tmp_path / "shapes", tmp_path / "run")
    assert digest.keys() == reference["digest"].keys()
    changed = [k for k, v in digest.items() if reference["digest"][k] != v]
    assert not changed, f"{len(changed)} tensors differ from the reference, e.g. {changed[:5]}"


def _write(entries: list[dict]) -> None:
    REFERENCE.write_text(json.dumps({"references": entries}, indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="record the default run's digest")
    parser.add_argument("--regenerate", action="store_true", help="this code's digest on this CPU, replacing all")
    parser.add_argument("--add", type=Path, metavar="JSON",
                        help="add the entries of another checkout's digest file (kept: other CPU kinds')")
    cli = parser.parse_args()
    if cli.add:
        added = json.loads(cli.add.read_text())
        added = added.get("references", [added])  # f18195c wrote one {machine, digest}
        kinds = [a["machine"] for a in added]
        _write([r for r in references() if r["machine"] not in kinds] + added)
        print(f"added {kinds} to {REFERENCE}")
    elif cli.regenerate:
        with tempfile.TemporaryDirectory() as tmp:
            digest = run_digest(Path(tmp) / "shapes", Path(tmp) / "run")
        _write([{"machine": _machine(), "digest": digest}])
        print(f"wrote {REFERENCE} ({len(digest)} entries, {_machine()})")
    else:
        parser.error("give --regenerate or --add JSON")
