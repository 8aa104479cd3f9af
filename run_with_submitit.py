"""Train DETR on a Slurm cluster through submitit: one task per GPU, requeued on preemption or timeout.

    python run_with_submitit.py --nodes 4 --ngpus 8 --timeout 4320 --coco_path /data/coco \
        --shared_dir /shared/$USER/detr     # or DETR_JOB_DIR=/shared/$USER/detr, or --job_dir DIR

Takes every main.py flag. The run directory (main.py's --output_dir) is the job folder
`<shared_dir>/<job id>/` (or --job_dir, where `%j` stands for the job id), a folder every node
can read and write. When Slurm signals a preemption or the coming time limit, the main task
sets --resume auto (the job folder's checkpoint.pth, as for a torchrun restart) and submitit
requeues the job, which then continues from the last saved epoch. `--executor local` runs the
same job on this machine (submitit's LocalExecutor, one process per --ngpus, CPU when --device
cpu) for testing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import submitit

import main as detr
from util.checkpoint import CHECKPOINT_NAME, RESUME_AUTO
from util.cli import HelpFormatter, exit_on_user_error
from util.flag_types import parse_flags, positive_int

REPO_DIR = Path(__file__).resolve().parent
JOB_DIR_ENV = "DETR_JOB_DIR"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(usage="%(prog)s [options]", description="Submitit for DETR",
                                     parents=[detr.get_args_parser()], formatter_class=HelpFormatter)
    slurm = parser.add_argument_group("Slurm job")
    slurm.add_argument("--ngpus", default=8, type=positive_int, help="GPUs (= tasks) per node")
    slurm.add_argument("--nodes", default=4, type=positive_int, help="number of nodes")
    slurm.add_argument("--timeout", default=60, type=positive_int, help="time limit of one job, in minutes")
    slurm.add_argument("--job_dir", default="", type=str,
                       help="job folder ('%%j' = job id); empty = <--shared_dir or $DETR_JOB_DIR>/%%j")
    slurm.add_argument("--shared_dir", default="", type=str,
                       help=f"folder shared by all nodes where job folders are made; empty: ${JOB_DIR_ENV}")
    slurm.add_argument("--partition", default="", type=str, help="Slurm partition (empty: the cluster's default)")
    slurm.add_argument("--use_volta32", action="store_true", help="ask for 32 GB V100s (constraint volta32gb)")
    slurm.add_argument("--comment", default="", type=str, help="Slurm comment (e.g. why the job has priority)")
    slurm.add_argument("--cpus_per_task", default=10, type=positive_int, help="CPU cores per task (data loading)")
    slurm.add_argument("--mem_per_gpu", default=40, type=positive_int, help="host memory per GPU, in GB")
    slurm.add_argument("--executor", default="slurm", choices=["slurm", "local"],
                       help="slurm: submit with sbatch; local: run here with submitit's LocalExecutor (tests)")
    return parser


def resolve_job_dir(job_dir: str, shared_dir: str, environ=os.environ) -> Path:
    """--job_dir if given; else <--shared_dir or $DETR_JOB_DIR>/%j. Raises if there is nowhere to put the job."""
    if job_dir:
        return Path(job_dir)
    base = shared_dir or environ.get(JOB_DIR_ENV, "")
    if not base:
        raise SystemExit(
            "run_with_submitit.py: no job folder. Pass --job_dir DIR, or --shared_dir DIR, or set "
            f"{JOB_DIR_ENV}=DIR, with DIR a folder that every node of the job can read and write."
        )
    return Path(base) / "%j"


class Trainer:
    """The submitted callable: runs main.main(args) in each task; `checkpoint()` prepares the requeue."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> None:
        if str(REPO_DIR) not in sys.path:  # the task may start in another working directory
            sys.path.insert(0, str(REPO_DIR))
        import main as detr_main

        self._setup_process_group_env()
        detr_main.main(self.args)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called on the main task at preemption/timeout: resume the requeued job from the job folder."""
        # main.py's `--resume auto` (the same path as a torchrun restart): the job folder's
        # checkpoint.pth when one exists, else a fresh start. A --resume the user gave still
        # applies while the job folder holds no checkpoint of its own.
        if not self.args.resume or (Path(self.args.output_dir) / CHECKPOINT_NAME).exists():
            self.args.resume = RESUME_AUTO
            self.args.overwrite = False  # the fresh start it asked for has happened; now the run continues
        print(f"Requeuing with --resume {self.args.resume}", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.args))

    def _setup_process_group_env(self) -> None:
        """Rank, world size and master from submitit's view of the job, for main.py's env:// set-up."""
        job_env = submitit.JobEnvironment()
        self.args.output_dir = str(self.args.output_dir).replace("%j", str(job_env.job_id))
        # A requeued or nested job may inherit old values: overwrite. CUDA_VISIBLE_DEVICES stays as
        # Slurm set it; util.distributed selects the GPU from LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        self.args.dist_url = "env://"
        print(f"Process group: rank {job_env.global_rank}/{job_env.num_tasks} on {job_env.hostname}", flush=True)


def make_executor(args: argparse.Namespace, folder: Path) -> submitit.Executor:
    """The executor with one task per GPU, the time limit and the Slurm options of the flags."""
    executor = submitit.AutoExecutor(folder=folder, cluster=args.executor, slurm_max_num_timeout=30)
    if args.executor == "local":
        executor.update_parameters(
            timeout_min=args.timeout,
            tasks_per_node=args.ngpus,
            gpus_per_node=args.ngpus if str(args.device).startswith("cuda") else 0,
        )
    else:
        slurm_options = {"slurm_constraint": "volta32gb"} if args.use_volta32 else {}
        if args.partition:
            slurm_options["slurm_partition"] = args.partition
        if args.comment:
            slurm_options["slurm_comment"] = args.comment
        executor.update_parameters(
            mem_gb=args.mem_per_gpu * args.ngpus,
            gpus_per_node=args.ngpus,
            tasks_per_node=args.ngpus,  # one task per GPU
            cpus_per_task=args.cpus_per_task,
            nodes=args.nodes,
            timeout_min=args.timeout,
            slurm_signal_delay_s=120,  # time to finish the checkpoint before the job is killed
            **slurm_options,
        )
    executor.update_parameters(name="detr")
    return executor


def submit(args: argparse.Namespace) -> submitit.Job:
    """Create the job folder, point --output_dir at it and submit the Trainer; returns the job."""
    job_dir = resolve_job_dir(args.job_dir, args.shared_dir)
    if args.executor == "local" and args.nodes != 1:
        print(f"--executor local runs on this machine: --nodes {args.nodes} -> 1")
        args.nodes = 1
    args.job_dir = str(job_dir)
    args.output_dir = str(job_dir)  # '%j' is replaced in each task, once the job id is known
    job_dir.parent.mkdir(parents=True, exist_ok=True)
    executor = make_executor(args, job_dir)
    job = executor.submit(Trainer(args))
    print(f"Submitted job {job.job_id}; run directory {str(job_dir).replace('%j', str(job.job_id))}")
    return job


def main(argv: list[str] | None = None) -> None:
    args = parse_flags(get_args_parser(), argv)
    job = submit(args)
    if args.executor == "local":
        job.results()  # a local job lives with this process; wait, and raise if a task failed


if __name__ == "__main__":
    with exit_on_user_error():
        main()
