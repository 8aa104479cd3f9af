"""One run per output folder, a log.txt that survives a cut line, interrupts and a full disk.

The behaviour a user sees is checked through the real command (main.py as a subprocess, a tiny
model, shapes data generated once for the module): exit status, the one-line message naming the
folder or file, and that the files already in the output folder are byte-identical afterwards.
The helpers underneath (util/run_lock.py, util/run_log.py) are checked in this process.
"""
import errno
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from util import run_lock
from util.cli import exit_on_user_error, note_epoch
from util.run_lock import RunFolderInUse, lock_run_folder, unlock_run_folder
from util.run_log import append_log_line, prepare_log, read_log

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "10", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "8",
        "--shapes_val_size", "2", "--batch_size", "2", "--lr_drop", "1000", "--lr_backbone", "0",
        "--print_freq", "1"]


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from datasets.shapes import ensure_shapes

    return ensure_shapes(tmp_path_factory.mktemp("data") / "shapes", 8, 2, 128)


def _command(shapes: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "main.py", *TINY, "--data_path", str(shapes), "--output_dir", str(out), *extra]


def _default_sigint() -> None:
    # A shell's background job may start with SIGINT ignored; Ctrl-C must reach the run.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(argv: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = _start(argv, **env)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The run's one `error:` line; no traceback besides it."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-4000:]
    return errors[0]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _logged_epochs(out: Path) -> list[int]:
    return [entry["epoch"] for entry in read_log(out / "log.txt")]


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"{what} did not happen\n{stdout[-3000:]}\n{stderr[-3000:]}")
        time.sleep(0.05)


def _lock_holder(out: Path) -> dict:
    try:
        return json.loads((out / run_lock.LOCK_NAME).read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def one_epoch(shapes, tmp_path_factory) -> Path:
    """A finished 1-epoch run (checkpoint.pth at epoch 0, log.txt with epoch 0)."""
    out = tmp_path_factory.mktemp("one_epoch") / "run"
    result = _run(_command(shapes, out, "--epochs", "1"))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("checkpoint.pth", "log.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# ---------------------------------------------------------------------------------------------
# One run per folder (util/run_lock.py)

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from util.run_lock import lock_run_folder
    lock_run_folder(sys.argv[1])
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _hold_lock(folder: Path, seconds: float, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), str(seconds)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_process_and_names_the_holder(tmp_path):
    holder = _hold_lock(tmp_path, 60)
    try:
        with pytest.raises(RunFolderInUse) as info:
            lock_run_folder(tmp_path)
        message = str(info.value)
        assert f"--output_dir {tmp_path} is in use by another run" in message
        assert f"pid {holder.pid} on host " in message and "started " in message and "UTC" in message
        assert "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    assert lock_run_folder(tmp_path)  # the kernel dropped the killed holder's lock
    assert _lock_holder(tmp_path)["pid"] == os.getpid()
    unlock_run_folder(tmp_path)


def test_requeued_slurm_job_waits_for_its_earlier_start(tmp_path, monkeypatch, capsys):
    holder = _hold_lock(tmp_path, 2, SLURM_JOB_ID="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert lock_run_folder(tmp_path, same_job_wait_s=60)
    assert "held by an earlier start of Slurm job 4242" in capsys.readouterr().out
    holder.wait()
    unlock_run_folder(tmp_path)

    other = _hold_lock(tmp_path, 60, SLURM_JOB_ID="999")  # another job: refused at once
    try:
        started = time.monotonic()
        with pytest.raises(RunFolderInUse, match=f"pid {other.pid}"):
            lock_run_folder(tmp_path, same_job_wait_s=60)
        assert time.monotonic() - started < 5
    finally:
        other.kill()
        other.wait()


def test_filesystem_without_locks_runs_unlocked_with_a_note(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    assert lock_run_folder(tmp_path) is False
    printed = capsys.readouterr().out
    assert f"note: {tmp_path / run_lock.LOCK_NAME}: this filesystem does not support file locks" in printed


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_forked_worker_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker forked from the run must not hold the folder after the run is gone."""
    assert lock_run_folder(tmp_path)
    child = multiprocessing.get_context("fork").Process(target=_sleep, args=(60,))
    child.start()
    try:
        unlock_run_folder(tmp_path)  # as if the run's process had died; its worker lives on
        _hold_lock(tmp_path, 0).wait()  # another process can take the folder
    finally:
        child.kill()
        child.join()


# ---------------------------------------------------------------------------------------------
# log.txt (util/run_log.py)


def test_cut_last_line_is_dropped_and_said(tmp_path, capsys):
    log = tmp_path / "log.txt"
    log.write_text('{"epoch": 0, "train_loss": 1.5}\n{"epoch": 1, "train_loss": 1.25}\n{"epoch": 2, "train_lo')
    assert [e["epoch"] for e in read_log(log)] == [0, 1]
    prepare_log(tmp_path, start_epoch=2)
    assert log.read_text() == '{"epoch": 0, "train_loss": 1.5}\n{"epoch": 1, "train_loss": 1.25}\n'
    printed = capsys.readouterr().out
    assert f"{log}: dropped its last line, cut short by a run stopped while writing it" in printed


def test_lines_of_epochs_to_train_again_are_dropped(tmp_path, capsys):
    log = tmp_path / "log.txt"
    lines = [json.dumps({"epoch": e, "train_loss": 1.0 / (e + 1)}) for e in range(4)]
    log.write_text("".join(line + "\n" for line in lines))
    prepare_log(tmp_path, start_epoch=2)  # checkpoint.pth holds epoch 1
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert "dropped the lines of epochs 2, 3; training continues at epoch 2" in capsys.readouterr().out
    before = log.read_bytes()
    prepare_log(tmp_path, start_epoch=2)  # nothing to do: the file is not rewritten
    assert log.read_bytes() == before and list(tmp_path.iterdir()) == [log]


@pytest.mark.parametrize("text, line, what", [
    ('{"epoch": 0}\nnot json\n{"epoch": 1}\n', 2, "is not JSON"),
    ('{"epoch": 0}\n{"epoch": 1, "train_lo\n{"epoch": 2}\n', 2, "is not JSON"),  # a cut line inside
    ('{"epoch": 0}\n[1, 2]\n', 2, "is a JSON list, not an object"),
    ('{"epoch": 0\n', 1, "is not JSON"),  # the last line has its newline: it was written whole
])
def test_other_bad_lines_name_the_file_and_line(tmp_path, text, line, what):
    log = tmp_path / "log.txt"
    log.write_text(text)
    with pytest.raises(ValueError) as info:
        prepare_log(tmp_path, start_epoch=5)
    assert f"{log} line {line} {what}" in str(info.value) and "correct or delete that line" in str(info.value)
    assert log.read_text() == text


def test_append_writes_whole_lines(tmp_path):
    for epoch in range(3):
        append_log_line(tmp_path, {"epoch": epoch, "train_loss": 0.5})
    assert (tmp_path / "log.txt").read_text().count("\n") == 3
    assert [e["epoch"] for e in read_log(tmp_path / "log.txt")] == [0, 1, 2]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs mount rights; skipped without them)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_append_on_a_full_disk_leaves_no_partial_line(tiny_tmpfs):
    append_log_line(tiny_tmpfs, {"epoch": 0, "train_loss": 0.5})
    before = (tiny_tmpfs / "log.txt").read_bytes()
    free = os.statvfs(tiny_tmpfs).f_bavail * os.statvfs(tiny_tmpfs).f_frsize
    (tiny_tmpfs / "filler").write_bytes(bytes(free - 4096))  # one page left
    with pytest.raises(OSError) as info:
        append_log_line(tiny_tmpfs, {"epoch": 1, "stats": "x" * 20000})  # more than a page
    message = str(info.value)
    assert f"could not append epoch 1's line to {tiny_tmpfs / 'log.txt'}" in message
    assert f"no space left on device (disk full at {tiny_tmpfs}" in message and "--resume auto" in message
    assert (tiny_tmpfs / "log.txt").read_bytes() == before  # the part that was written is cut away


# ---------------------------------------------------------------------------------------------
# Interrupts (util/cli.py)


def test_interrupts_exit_with_one_line_and_the_signal_status(tmp_path, capsys):
    (tmp_path / "checkpoint.pth").write_bytes(b"epoch 3")
    with pytest.raises(SystemExit) as info:
        with exit_on_user_error():
            note_epoch(4, tmp_path)
            raise KeyboardInterrupt
    assert info.value.code == 130
    assert capsys.readouterr().err == (f"error: interrupted (Ctrl-C) in epoch 4; the last saved checkpoint "
                                       f"{tmp_path / 'checkpoint.pth'} is intact: continue with --resume auto\n")

    with pytest.raises(SystemExit) as info:
        with exit_on_user_error():
            note_epoch(0, tmp_path / "fresh")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    assert info.value.code == 143
    assert capsys.readouterr().err == (f"error: stopped by SIGTERM in epoch 0; no checkpoint saved in "
                                       f"{tmp_path / 'fresh'} yet: run the command again with --resume auto\n")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # only inside the block

    with pytest.raises(SystemExit) as info:  # torch.save turns a Ctrl-C into "unexpected pos"
        with exit_on_user_error():
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 46 vs 0")
    assert info.value.code == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"  # outside training: no epoch


# ---------------------------------------------------------------------------------------------
# Through main.py


def _without_lock_file(hashes: dict[str, str]) -> dict[str, str]:
    """The lock file names its holder: each run that takes the folder rewrites it."""
    return {name: digest for name, digest in hashes.items() if name != run_lock.LOCK_NAME}


def test_second_run_into_a_busy_folder_is_refused_and_an_eval_is_not(shapes, tmp_path):
    out = tmp_path / "run"
    first = _start(_command(shapes, out, "--epochs", "2"))
    _wait_for(lambda: (out / "checkpoint.pth").exists() and _lock_holder(out).get("pid") == first.pid,
              first, "epoch 0's checkpoint")
    os.killpg(first.pid, signal.SIGSTOP)  # the first run holds still while the others try
    try:
        before = _hashes(out)
        second = _run(_command(shapes, out, "--epochs", "2", "--resume", "auto"))
        assert second.returncode == 2
        line = _error_line(second)
        holder = _lock_holder(out)
        assert line.startswith(f"error: --output_dir {out} is in use by another run (pid {first.pid} on host "
                               f"{holder['host']}, started {holder['started']}: "), line
        assert "Epoch: [" not in second.stdout  # refused before any work
        assert _hashes(out) == before

        # --eval takes no lock: it writes eval.pth only, which training never writes.
        evaluation = _run(_command(shapes, out, "--eval", "--resume", str(out / "checkpoint.pth")))
        assert evaluation.returncode == 0, evaluation.stderr[-4000:]
        after = _hashes(out)
        assert after.pop("eval.pth") and after == before
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-4000:]
    assert _logged_epochs(out) == [0, 1]


def test_cut_log_line_is_dropped_and_the_run_resumes(one_epoch, shapes, tmp_path):
    out = _copy_run(one_epoch, tmp_path / "run")
    with (out / "log.txt").open("a") as f:
        f.write('{"train_lr": 0.0001, "train_loss": 3.1')  # a kill or a full disk mid-append
    result = _run(_command(shapes, out, "--epochs", "2", "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"{out / 'log.txt'}: dropped its last line, cut short by a run stopped while writing it" in result.stdout
    assert _logged_epochs(out) == [0, 1]


def test_bad_log_line_stops_the_run_naming_file_and_line(one_epoch, shapes, tmp_path):
    out = _copy_run(one_epoch, tmp_path / "run")
    (out / "log.txt").write_text("<<<<<<< merge leftover\n" + (out / "log.txt").read_text())
    before = _hashes(out)
    result = _run(_command(shapes, out, "--epochs", "2", "--resume", "auto"))
    assert result.returncode == 2
    assert f"{out / 'log.txt'} line 1 is not JSON" in _error_line(result)
    assert _without_lock_file(_hashes(out)) == before


@pytest.mark.parametrize("signum, to_group, status, said", [
    (signal.SIGINT, True, 130, "interrupted (Ctrl-C)"),  # a terminal's Ctrl-C reaches the workers too
    pytest.param(signal.SIGTERM, False, 143, "stopped by SIGTERM", marks=pytest.mark.slow),
])
def test_interrupt_mid_epoch_is_one_line_and_keeps_the_checkpoint(shapes, tmp_path, signum, to_group, status, said):
    out = tmp_path / "run"
    # 32 iterations an epoch (not the fixture's 4), so that a slow or busy machine still signals inside epoch 1
    proc = _start(_command(shapes, out, "--epochs", "2", "--num_workers", "2", "--print_freq", "1",
                           "--data_path", str(tmp_path / "shapes64"), "--shapes_train_size", "64"),
                  PYTHONUNBUFFERED="1")
    seen = []  # stdout read up to epoch 1's first progress line: the signal then lands inside epoch 1
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("Epoch: [1]"):
            break
    assert (out / "checkpoint.pth").exists(), "".join(seen)[-4000:]
    before = _hashes(out)
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    stdout = "".join(seen) + stdout
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == status, stderr[-4000:]
    assert _error_line(result) == (f"error: {said} in epoch 1; the last saved checkpoint {out / 'checkpoint.pth'} "
                                   "is intact: continue with --resume auto")
    after = _hashes(out)
    assert after["checkpoint.pth"] == before["checkpoint.pth"]
    assert [name for name in after if ".tmp" in name] == []


# Runs main.py as __main__ with torch.save writing in slow chunks, each write announced on stdout.
SLOW_SAVE = textwrap.dedent("""
    import io, runpy, sys, time
    import torch

    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        print("writing", getattr(f, "name", f), flush=True)
        data = buffer.getvalue()
        for start in range(0, len(data), len(data) // 20 + 1):
            f.write(data[start:start + len(data) // 20 + 1])
            time.sleep(0.1)

    torch.save = slow_save
    sys.argv = ["main.py"] + sys.argv[1:]
    runpy.run_path("main.py", run_name="__main__")
""")


@pytest.mark.slow  # the same in-process: tests/test_checkpoint_io.py::test_ctrl_c_inside_torch_save_is_an_interrupt_not_a_save_failure
def test_ctrl_c_during_a_checkpoint_write_is_an_interrupt(one_epoch, shapes, tmp_path):
    out = _copy_run(one_epoch, tmp_path / "run")
    before = _hashes(out)
    wrapper = tmp_path / "slow_save.py"
    wrapper.write_text(SLOW_SAVE)
    proc = _start([sys.executable, str(wrapper), *_command(shapes, out, "--epochs", "2", "--resume", "auto")[2:]],
                  PYTHONPATH=str(ROOT))
    for line in proc.stdout:
        if line.startswith("writing") and ".checkpoint.pth.tmp-" in line:
            break
    time.sleep(0.5)  # about a quarter of the file is written
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 130, stderr[-4000:]
    assert _error_line(result) == (f"error: interrupted (Ctrl-C) in epoch 1; the last saved checkpoint "
                                   f"{out / 'checkpoint.pth'} is intact: continue with --resume auto")
    after = _hashes(out)
    assert after["checkpoint.pth"] == before["checkpoint.pth"]
    assert [name for name in after if ".tmp" in name] == []


@pytest.fixture
def small_disk(tmp_path):
    """A 160 MiB tmpfs (two tiny-model checkpoints and a little): a real full disk, no root tricks in
    the program. Needs mount rights; skipped without them."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_and_the_run_continues_once_space_is_freed(one_epoch, shapes, small_disk):
    out = _copy_run(one_epoch, small_disk / "run")
    stat = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(bytes(stat.f_bavail * stat.f_frsize - 8 * 2**20))  # 8 MiB left: too little for a checkpoint
    before = _hashes(out)
    result = _run(_command(shapes, out, "--epochs", "2", "--resume", "auto"))
    assert result.returncode == 2
    line = _error_line(result)
    assert f"no space left on device (disk full at {out}: about " in line, line
    assert "MiB needed" in line and "left intact" in line and "--resume auto" in line
    after = _hashes(out)
    assert after["checkpoint.pth"] == before["checkpoint.pth"]
    assert [name for name in after if ".tmp" in name] == []

    filler.unlink()
    result = _run(_command(shapes, out, "--epochs", "2", "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert _logged_epochs(out) == [0, 1]
