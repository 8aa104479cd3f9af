"""run_with_submitit.py through submitit's local executor: preempted, requeued, resumed from its checkpoint.

A 2-task job (2 CPU processes, gloo) trains 2 epochs on shapes. Once epoch 0's checkpoint exists,
both tasks get the preemption/timeout signal Slurm would send (SIGUSR2). The main task points
--resume at the job folder's checkpoint.pth and exits for requeue; submitit restarts the job,
which continues at epoch 1 and ends after it.
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest

import run_with_submitit
from util.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2


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
        _tiny_flags(data) + ["--epochs", str(EPOCHS), "--eval_every", "0", "--executor", "local", "--ngpus", "2", "--nodes", "1",
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
    job.results()  # raises if a task of the requeued job failed

    stdout = job.task(0).stdout()
    assert "Requeuing with --resume auto" in stdout  # the requeue resumes through main.py's --resume auto
    assert f"--resume auto: resuming from {checkpoint}" in stdout
    assert stdout.count("Start training") == 2  # the first run and the requeued one
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "log.txt").read_text().splitlines()]
    assert epochs == list(range(EPOCHS))
    final = load_checkpoint(checkpoint)
    assert final["epoch"] == EPOCHS - 1
    # The requeued run started after the saved epoch, not from scratch.
    assert final["args"].resume == str(checkpoint)
    assert final["args"].start_epoch == 1
    assert final["args"].world_size == 2


def test_slurm_job_asks_one_task_per_gpu_and_an_early_signal(tmp_path, monkeypatch):
    """The sbatch script submitit would write for --nodes 2 --ngpus 8 (a stand-in srun makes this a Slurm host)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    args = run_with_submitit.get_args_parser().parse_args(
        ["--nodes", "2", "--ngpus", "8", "--timeout", "4320", "--partition", "gpu", "--use_volta32",
         "--comment", "deadline"])
    executor = run_with_submitit.make_executor(args, tmp_path / "%j")
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=320GB",
                 "--time=4320", "--partition=gpu", "--constraint=volta32gb", "--comment=deadline",
                 "--signal=USR2@120", "--job-name=detr"):
        assert f"#SBATCH {line}\n" in script
    plain = run_with_submitit.make_executor(run_with_submitit.get_args_parser().parse_args([]), tmp_path / "%j")
    plain_script = plain._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    assert "--partition" not in plain_script and "--constraint" not in plain_script  # the cluster's defaults
    assert "#SBATCH --nodes=4\n" in plain_script and "#SBATCH --ntasks-per-node=8\n" in plain_script


def test_job_folder_from_flag_env_or_clear_error(tmp_path):
    assert run_with_submitit.resolve_job_dir("/runs/a_%j", "", environ={}) == Path("/runs/a_%j")
    assert run_with_submitit.resolve_job_dir("", "/shared", environ={}) == Path("/shared/%j")
    assert run_with_submitit.resolve_job_dir("", "", environ={"DETR_JOB_DIR": "/env"}) == Path("/env/%j")
    with pytest.raises(SystemExit, match="--job_dir DIR, or --shared_dir DIR, or set DETR_JOB_DIR"):
        run_with_submitit.resolve_job_dir("", "", environ={})
