"""run_with_submitit.py through submitit's local executor: preempted, requeued, resumed from its checkpoint.

A 2-task job (2 CPU processes, gloo) trains 3 epochs on shapes. Once epoch 0's checkpoint exists,
both tasks get the preemption/timeout signal Slurm would send (SIGUSR2). The main task points
--resume at the job folder's checkpoint.pth and exits for requeue; submitit restarts the job,
which continues at epoch 1 and ends after epoch 2.
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import run_with_submitit

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3


def _tiny_flags(data: Path) -> list[str]:
    return ["--device", "cpu", "--dataset_file", "shapes", "--data_path", str(data),
            "--shapes_train_size", "8", "--shapes_val_size", "4", "--image_scale", "0.16",
            "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
            "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1",
            "--num_queries", "10", "--num_workers", "0", "--batch_size", "1", "--print_freq", "100"]


def _task_pids(controller_pid: int) -> list[int]:
    children = Path(f"/proc/{controller_pid}/task/{controller_pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def _wait_for(condition, what: str, job, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline or (job.done() and not condition()):
            job.cancel()
            pytest.fail(f"{what} did not happen\nstdout:\n{job.stdout()}\nstderr:\n{(job.stderr() or '')[-5000:]}")
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the task processes through /proc")
def test_preempted_job_requeues_and_resumes_from_saved_epoch(tmp_path, monkeypatch):
    from datasets.shapes import ensure_shapes

    data = ensure_shapes(tmp_path / "shapes", 8, 4, 128)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the tasks unpickle run_with_submitit.Trainer
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
    args = run_with_submitit.get_args_parser().parse_args(
        _tiny_flags(data) + ["--epochs", str(EPOCHS), "--executor", "local", "--ngpus", "2", "--nodes", "1",
                             "--timeout", "10", "--job_dir", str(tmp_path / "jobs" / "%j")])
    job = run_with_submitit.submit(args)
    run_dir = tmp_path / "jobs" / str(job.job_id)
    checkpoint = run_dir / "checkpoint.pth"

    _wait_for(checkpoint.exists, "epoch 0 checkpoint", job, timeout_s=240)
    tasks = _task_pids(int(job.job_id))
    assert len(tasks) == 2
    for pid in tasks:  # Slurm signals every task of the job
        os.kill(pid, signal.SIGUSR2)

    _wait_for(job.done, "job end", job, timeout_s=400)
    job.result()  # raises if the requeued job failed

    stdout = job.stdout()
    assert f"Requeuing; resume from {checkpoint}" in stdout
    assert stdout.count("Start training") == 2  # the first run and the requeued one
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "log.txt").read_text().splitlines()]
    assert epochs == list(range(EPOCHS))
    final = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert final["epoch"] == EPOCHS - 1
    # The requeued run started after the saved epoch, not from scratch.
    assert final["args"].resume == str(checkpoint)
    assert 1 <= final["args"].start_epoch < EPOCHS
    assert final["args"].world_size == 2
