"""A checkpoint that would run code when unpickled is refused by every loading path, unexecuted."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from util.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "10", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu"]
REFUSAL = "not a plain-weights checkpoint"


class _Payload:
    """Unpickling this calls exec, which writes the marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _malicious_checkpoint(directory: Path, name: str = "evil.pth") -> tuple[Path, Path]:
    """A checkpoint that looks like a real one (model weights, epoch) but hides the payload in 'args'."""
    marker = directory / f"{name}.EXECUTED"
    path = directory / name
    torch.save({"model": {"class_embed.weight": torch.zeros(2, 2)}, "epoch": 0, "args": _Payload(marker)}, path)
    return path, marker


def _need(script: str) -> None:
    if not (ROOT / script).is_file():
        pytest.skip(f"{script} has not landed yet")


def _run(argv: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_payload_really_executes_when_loaded_unsafely(tmp_path):
    # Guards the other tests: the marker appears if anything unpickles the file without weights_only.
    path, marker = _malicious_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file_url"])
def test_load_checkpoint_refuses_without_executing(tmp_path, as_url):
    path, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path.as_uri() if as_url else path)
    assert REFUSAL in str(info.value) and "evil.pth" in str(info.value)
    assert "(it needs exec)" in str(info.value) or "builtins.exec" in str(info.value)  # names what it asked to run
    assert not marker.exists()


def test_https_url_through_hub_cache_is_refused_without_executing():
    # The release name is already in the (test-isolated) hub cache, so nothing is downloaded.
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    hub_checkpoints.mkdir(parents=True, exist_ok=True)
    _, marker = _malicious_checkpoint(hub_checkpoints, "detr-r50-e632da11.pth")
    with pytest.raises(CheckpointError, match=REFUSAL):
        load_checkpoint("https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth")
    assert not marker.exists()


def test_raw_pickle_is_refused_without_executing(tmp_path):
    import pickle

    marker = tmp_path / "raw.EXECUTED"
    path = tmp_path / "raw.pth"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(CheckpointError, match=REFUSAL):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("flag, extra", [("--resume", []), ("--finetune", []), ("--frozen_weights", ["--masks"])])
def test_main_refuses(tmp_path, flag, extra):
    _need("main.py")
    path, marker = _malicious_checkpoint(tmp_path)
    result = _run(["main.py", *TINY, "--dataset_file", "shapes", "--data_path", str(tmp_path / "shapes"),
                   "--shapes_train_size", "8", "--shapes_val_size", "4", "--epochs", "1",
                   "--output_dir", str(tmp_path / "out"), flag, str(path), *extra])
    assert result.returncode != 0, result.stdout[-2000:]
    assert REFUSAL in result.stderr, result.stderr[-3000:]
    assert "evil.pth" in result.stderr
    assert not marker.exists()


def test_predict_refuses(tmp_path):
    _need("predict.py")
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(images / "a.jpg")
    path, marker = _malicious_checkpoint(tmp_path)
    result = _run(["predict.py", *TINY, "--resume", str(path), "--img_dirs", str(images),
                   "--output_dir", str(tmp_path / "pred")])
    assert result.returncode != 0, result.stdout[-2000:]
    assert REFUSAL in result.stderr, result.stderr[-3000:]
    assert not marker.exists()


def test_hubconf_refuses_poisoned_cache(tmp_path, monkeypatch):
    """A release file replaced in the torch hub cache (no download, so no hash check) is refused."""
    _need("hubconf.py")
    monkeypatch.syspath_prepend(str(ROOT))
    hub_checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    hub_checkpoints.mkdir(parents=True, exist_ok=True)
    _, marker = _malicious_checkpoint(hub_checkpoints, "detr-r50-e632da11.pth")
    import hubconf

    with pytest.raises(Exception) as info:
        hubconf.detr_resnet50(pretrained=True)
    assert REFUSAL in str(info.value) or "Weights only load failed" in str(info.value), str(info.value)
    assert not marker.exists()
