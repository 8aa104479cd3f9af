"""main.py killed with SIGKILL at random moments, including mid checkpoint write, always resumes.

Each round starts main.py (with --resume auto) and kills it: while a checkpoint is being written
(torch.save is slowed down by a wrapper and announces each write), halfway through appending
log.txt's line (the wrapper splits that write in two with a pause between), or after a random
delay. A round may also start a second run into the same folder at once: exactly one of the two
is refused (exit 2, the folder named), the other goes on. After every kill the checkpoint on
disk must be complete and readable and the killed run's lock gone; the last round runs to the
end and must have logged each epoch exactly once.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from util.checkpoint import find_resumable, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "10", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "4",
        "--shapes_val_size", "2", "--batch_size", "2", "--lr_drop", "1000", "--lr_backbone", "0"]

# Runs main.py as __main__ with torch.save writing in slow chunks; each write is announced in
# $WRITES_FILE first, so the test can kill the process while the temporary file is half written.
# Appends to log.txt are written half, announced in $LOG_WRITES_FILE, and finished 0.3 s later.
SLOW_SAVE_WRAPPER = """
import io, os, runpy, sys, time
import torch

real_write = os.write
half_written = set()

def slow_log_write(fd, data):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if not name.endswith("log.txt") or fd in half_written or len(data) < 2:
        half_written.discard(fd)
        return real_write(fd, data)
    count = real_write(fd, data[:len(data) // 2])
    half_written.add(fd)
    with open(os.environ["LOG_WRITES_FILE"], "a") as log:
        log.write("log\\n")
    time.sleep(0.3)
    return count  # a short write: the caller writes the rest

os.write = slow_log_write

real_save = torch.save

def slow_save(obj, f, *args, **kwargs):
    if not hasattr(f, "write"):
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    with open(os.environ["WRITES_FILE"], "a") as log:
        log.write(f"{len(data)}\\n")
    step = max(1, len(data) // 10)
    for start in range(0, len(data), step):
        f.write(data[start:start + step])
        f.flush()
        time.sleep(0.03)

torch.save = slow_save
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""


def _writes(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _start(tmp_path: Path, out: Path, epochs: int) -> subprocess.Popen:
    wrapper = tmp_path / "slow_save_main.py"
    wrapper.write_text(SLOW_SAVE_WRAPPER)
    argv = [sys.executable, str(wrapper), *TINY, "--data_path", str(tmp_path / "shapes"),
            "--epochs", str(epochs), "--output_dir", str(out), "--resume", "auto"]
    env = dict(os.environ, WRITES_FILE=str(tmp_path / "writes.txt"), LOG_WRITES_FILE=str(tmp_path / "log_writes.txt"),
               PYTHONPATH=str(ROOT))
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_during_write(proc: subprocess.Popen, writes_file: Path, rng: random.Random, timeout: float,
                       within_s: float = 0.25) -> bool:
    """Wait for the next write announced in `writes_file`, then SIGKILL inside it (within `within_s`
    of its start). False if the run ended first."""
    seen = _writes(writes_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _writes(writes_file) > seen:
            time.sleep(rng.uniform(0.0, within_s))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    return False


def _start_two(tmp_path: Path, out: Path, epochs: int) -> subprocess.Popen:
    """Two runs into `out` at once: one is refused (exit 2, naming the folder); returns the other."""
    first, second = _start(tmp_path, out, epochs), _start(tmp_path, out, epochs)
    while first.poll() is None and second.poll() is None:
        time.sleep(0.05)
    refused, running = (first, second) if first.poll() is not None else (second, first)
    output = refused.stdout.read()
    refused.stdout.close()
    assert refused.returncode == 2, output[-4000:]
    assert f"error: --output_dir {out} is in use by another run (pid {running.pid} on host " in output, output[-4000:]
    return running


def _kill_after(proc: subprocess.Popen, delay: float) -> bool:
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _check_resumable(out: Path) -> int:
    """The checkpoint on disk (if any) loads; return its epoch (-1 if none)."""
    path = find_resumable(out)
    if path is None:
        return -1
    checkpoint = load_checkpoint(path)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args"} <= checkpoint.keys()
    return checkpoint["epoch"]


def _kill_loop(tmp_path: Path, epochs: int, plan: list[str], rng: random.Random) -> list[int]:
    out = tmp_path / "out"
    writes_file = tmp_path / "writes.txt"
    epochs_seen = []
    for step in plan:
        proc = _start_two(tmp_path, out, epochs) if step == "twice" else _start(tmp_path, out, epochs)
        if step == "write":
            killed = _kill_during_write(proc, writes_file, rng, timeout=120)
        elif step == "log":
            killed = _kill_during_write(proc, tmp_path / "log_writes.txt", rng, timeout=120, within_s=0.2)
        else:
            killed = _kill_after(proc, rng.uniform(1.0, 12.0))
        if not killed:
            assert proc.returncode == 0, proc.stdout.read()[-4000:]
            proc.stdout.close()
            break
        proc.stdout.close()
        epoch = _check_resumable(out)
        assert not epochs_seen or epoch >= epochs_seen[-1], "a resumed run went back in time"
        epochs_seen.append(epoch)
    final = _start(tmp_path, out, epochs)
    output, _ = final.communicate(timeout=300)
    assert final.returncode == 0, output[-4000:]

    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == epochs - 1
    logged = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines() if line.strip()]
    assert logged == list(range(epochs)), f"log.txt epochs {logged}; kills left checkpoints at {epochs_seen}"
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    return epochs_seen


def test_kills_during_checkpoint_write_and_log_append_resume(tmp_path):
    rng = random.Random(8)
    seen = _kill_loop(tmp_path, epochs=2, plan=["write", "log"], rng=rng)
    assert seen[0] in (-1, 0)  # killed inside the first write: no checkpoint yet, or the complete epoch 0
    assert _writes(tmp_path / "writes.txt") >= 3  # eval/latest.pth and checkpoint.pth per epoch, some redone
    assert _writes(tmp_path / "log_writes.txt") >= 3  # the cut append, then every epoch's line once more


@pytest.mark.slow
def test_many_random_kills_and_a_second_run_at_once(tmp_path):
    seed = int(os.environ.get("KILL_SEED", "20"))
    rng = random.Random(seed)
    plan = ["twice"] + [rng.choice(["write", "log", "random", "twice"]) for _ in range(11)]
    _kill_loop(tmp_path, epochs=5, plan=plan, rng=rng)
