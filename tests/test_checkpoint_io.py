"""util/checkpoint.py: atomic saves survive failures mid-write; checkpoints round-trip under weights_only."""
import argparse
import errno
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from util import checkpoint as ckpt
from util.checkpoint import CheckpointError


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _save_old(path: Path) -> bytes:
    ckpt.save_checkpoint({"model": {"w": torch.arange(4.0)}, "epoch": 1}, path)
    return path.read_bytes()


def test_failure_after_partial_bytes_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth"
    old = _save_old(target)
    real_save = torch.save

    def save_then_die(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the temp file first
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth.*simulated crash.*left intact"):
        ckpt.save_checkpoint({"model": {"w": torch.zeros(4)}, "epoch": 2}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == old
    assert _files(tmp_path) == ["checkpoint.pth"]
    assert ckpt.load_checkpoint(target)["epoch"] == 1


def test_disk_full_keeps_old_file_and_names_cause(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth"
    old = _save_old(target)

    def fsync_disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_disk_full)
    with pytest.raises(CheckpointError) as info:
        ckpt.save_checkpoint({"model": {"w": torch.zeros(4)}, "epoch": 2}, target)
    monkeypatch.undo()
    message = str(info.value)
    assert str(target) in message and "disk full" in message and "left intact" in message
    assert target.read_bytes() == old
    assert _files(tmp_path) == ["checkpoint.pth"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_from_killed_write_is_removed_by_next_save_and_never_resumed(tmp_path):
    stale = tmp_path / f".checkpoint.pth.tmp-{_dead_pid()}-deadbeef"
    stale.write_bytes(b"PK\x03\x04 truncated by SIGKILL")
    assert ckpt.find_resumable(tmp_path) is None  # a temp file alone is not a checkpoint
    _save_old(tmp_path / "checkpoint.pth")
    assert _files(tmp_path) == ["checkpoint.pth"]
    assert ckpt.find_resumable(tmp_path) == tmp_path / "checkpoint.pth"


def test_temp_file_of_a_live_writer_is_left_to_it(tmp_path):
    """Two --eval runs writing eval.pth at once: neither deletes the other's temporary file."""
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".eval.pth.tmp-{writer.pid}-0123abcd"
        busy.write_bytes(b"PK\x03\x04 being written")
        _save_old(tmp_path / "eval.pth")
        assert _files(tmp_path) == [busy.name, "eval.pth"]
    finally:
        writer.kill()
        writer.wait()


def _raise_in_write(monkeypatch, error: BaseException, after_bytes: int = 64) -> None:
    """torch.save's writes into the temporary file fail with `error` once `after_bytes` are written."""
    real_save = torch.save

    class FailingWriter(io.RawIOBase):
        def __init__(self, f):
            self.f, self.count = f, 0

        def writable(self):
            return True

        def write(self, data):
            if self.count >= after_bytes:
                raise error
            self.count += len(data)
            return self.f.write(data)

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, FailingWriter(f), *a, **k))


def test_ctrl_c_inside_torch_save_is_an_interrupt_not_a_save_failure(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth"
    old = _save_old(target)
    _raise_in_write(monkeypatch, KeyboardInterrupt())  # torch wraps it: RuntimeError "unexpected pos"
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"model": {"w": torch.zeros(4096)}, "epoch": 2}, target)
    assert target.read_bytes() == old
    assert _files(tmp_path) == ["checkpoint.pth"]


def test_disk_full_inside_torch_save_names_the_cause_not_torch_internals(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pth"
    old = _save_old(target)
    _raise_in_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointError) as info:
        ckpt.save_checkpoint({"model": {"w": torch.zeros(2**20)}, "epoch": 2}, target)
    message = str(info.value)
    assert "unexpected pos" not in message
    assert f"no space left on device (disk full at {tmp_path}: about 4.0 MiB needed" in message
    assert "left intact" in message and "--resume auto" in message
    assert target.read_bytes() == old
    assert _files(tmp_path) == ["checkpoint.pth"]


def test_real_full_disk_keeps_the_old_checkpoint(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        target = mount / "checkpoint.pth"
        ckpt.save_checkpoint({"model": {"w": torch.zeros(2**16)}, "epoch": 1}, target)  # 256 KiB
        old = target.read_bytes()
        with pytest.raises(CheckpointError) as info:
            ckpt.save_checkpoint({"model": {"w": torch.zeros(2**18)}, "epoch": 2}, target)  # 1 MiB
        message = str(info.value)
        assert f"could not save checkpoint {target}: no space left on device (disk full at {mount}: " in message
        assert "about 1.0 MiB needed" in message and "unexpected pos" not in message
        assert target.read_bytes() == old
        assert _files(mount) == ["checkpoint.pth"]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_find_resumable_refuses_damaged_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.find_resumable(tmp_path)


def test_round_trip_with_args_and_rng_state_under_weights_only(tmp_path):
    args = argparse.Namespace(lr=1e-4, backbone="resnet50", output_dir=str(tmp_path), resume="",
                              frozen_weights=None, masks=False, epochs=300, set_cost_class=1.0,
                              data_root=Path("/data/coco"))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7,
                          "args": args, "rng_state": ckpt.capture_rng_state()}, tmp_path / "c.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    random.seed(10), np.random.seed(20), torch.manual_seed(30)
    # The file must load with plain torch.load(weights_only=True) under the published allow-list.
    with torch.serialization.safe_globals(ckpt.SAFE_GLOBALS):
        raw = torch.load(tmp_path / "c.pth", weights_only=True)
    loaded = ckpt.load_checkpoint(tmp_path / "c.pth")
    assert raw.keys() == loaded.keys()
    assert loaded["args"] == args and loaded["epoch"] == 7
    assert torch.equal(loaded["model"]["weight"], model.weight)
    assert loaded["optimizer"]["state"][0]["step"] == 1
    ckpt.restore_rng_state(loaded["rng_state"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_bare_state_dict_is_wrapped(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "sd.pth")
    loaded = ckpt.load_checkpoint(tmp_path / "sd.pth")
    assert list(loaded) == ["model"] and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_missing_truncated_and_corrupt_files_name_the_file(tmp_path):
    good = tmp_path / "good.pth"
    _save_old(good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "garbage.pth").write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match=r"missing\.pth does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pth")
    for name in ["truncated.pth", "empty.pth", "garbage.pth"]:
        with pytest.raises(CheckpointError, match=rf"{name}.*(truncated or corrupt|not a plain-weights)"):
            ckpt.load_checkpoint(tmp_path / name)


def test_file_url_checks_sha256_prefix(tmp_path):
    import hashlib

    src = tmp_path / "src.pth"
    _save_old(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    good = tmp_path / f"detr-{digest[:8]}.pth"
    bad = tmp_path / f"detr-{'0' if digest[0] != '0' else '1'}{digest[1:8]}.pth"
    good.write_bytes(src.read_bytes())
    bad.write_bytes(src.read_bytes())
    assert ckpt.load_checkpoint(good.as_uri())["epoch"] == 1
    with pytest.raises(CheckpointError, match="sha256 prefix"):
        ckpt.load_checkpoint(bad.as_uri())


def _unwritable_dir(tmp_path: Path) -> Path:
    # A path below a regular file cannot be created, even by root (chmod does not stop root).
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return blocker / "out"


def test_unwritable_output_dir_gives_clear_error(tmp_path):
    out = _unwritable_dir(tmp_path)
    with pytest.raises(CheckpointError, match=r"a_file/out.*(not writable|does not exist|cannot be used)"):
        ckpt.save_checkpoint({"model": {}}, out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"output directory .*a_file/out cannot be used"):
        ckpt.ensure_writable_dir(out)
    assert ckpt.ensure_writable_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"


def test_read_only_dir_gives_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (covered by the path-under-a-file test)")
        with pytest.raises(CheckpointError, match="not writable"):
            ckpt.save_checkpoint({"model": {}}, ro / "checkpoint.pth")
    finally:
        ro.chmod(0o700)


def test_only_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    ckpt.save_checkpoint({"model": {}}, tmp_path / "checkpoint.pth")
    assert _files(tmp_path) == []
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    ckpt.save_checkpoint({"model": {}}, tmp_path / "checkpoint.pth")
    assert _files(tmp_path) == ["checkpoint.pth"]


class _TinyDetr(torch.nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.class_embed = torch.nn.Linear(8, num_classes + 1)
        self.query_embed = torch.nn.Embedding(5, 8)
        self.bn = torch.nn.BatchNorm1d(8)


def test_load_model_state_lists_class_count_mismatch():
    source, target = _TinyDetr(91), _TinyDetr(4)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_model_state(target, source.state_dict(), what="checkpoint coco.pth")
    message = str(info.value)
    assert "checkpoint coco.pth" in message
    assert "class_embed.weight: checkpoint [92, 8] vs model [5, 8]" in message
    assert "checkpoint for 91 classes, model for 4; use --finetune" in message


def test_load_model_state_lists_missing_unexpected_and_tolerates_num_batches_tracked():
    target = _TinyDetr(4)
    sd = {k: v.clone() + 1 for k, v in target.state_dict().items() if not k.endswith("num_batches_tracked")}
    ckpt.load_model_state(target, sd)  # only num_batches_tracked absent: loads
    assert torch.equal(target.class_embed.bias, sd["class_embed.bias"])

    extra = dict(sd, **{"transformer.decoder.layers.5.linear1.weight": torch.ones(1)})
    del extra["query_embed.weight"]
    with pytest.raises(CheckpointError) as info:
        ckpt.load_model_state(target, extra)
    message = str(info.value)
    assert "missing keys (1): query_embed.weight" in message
    assert "unexpected keys (1): transformer.decoder.layers.5.linear1.weight" in message
    assert "--enc_layers/--dec_layers" in message


def test_load_model_state_names_masks_model():
    box = _TinyDetr(4)
    segm_sd = {f"detr.{k}": v for k, v in box.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"segmentation \(--masks\) model; add --masks"):
        ckpt.load_model_state(box, segm_sd)
