"""With every convergence flag at its default (--group_detr 1, no EMA), training is
bit-identical to the code before those flags existed.

The run uses --no_fast_train: the default fast training path (fast.optimize_for_training:
frozen BatchNorm inside its convolution, channels_last) is another summation order by design and
is held to the plain path's loss within 1e-5 by tests/test_fast_paths.py and test_main_e2e.py.

tests/data/default_run_digest.json holds the sha256 of every tensor of a 2-epoch tiny run's
checkpoint (model and optimizer state) written by the code before the flags landed, on this
project's CI machine kind. Floating-point kernels differ between CPU generations, so the digest is
only comparable on the CPU it was recorded on; elsewhere the test skips, naming both CPUs.
Regenerate (only when a change is *meant* to alter default numbers): `python tests/test_default_bit_identity.py`.
"""
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


def test_default_flags_reproduce_the_reference_bit_for_bit(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    if reference["machine"] != _machine():
        pytest.skip(f"the reference digest was recorded on {reference['machine']}, this machine is {_machine()}: "
                    "float kernels differ between CPUs")
    digest = run_digest(tmp_path / "shapes", tmp_path / "run")
    assert digest.keys() == reference["digest"].keys()
    changed = [k for k, v in digest.items() if reference["digest"][k] != v]
    assert not changed, f"{len(changed)} tensors differ from the reference, e.g. {changed[:5]}"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        digest = run_digest(Path(tmp) / "shapes", Path(tmp) / "run")
    REFERENCE.write_text(json.dumps({"machine": _machine(), "digest": digest}, indent=0, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE} ({len(digest)} entries)")
