"""main.py under torchrun and torch.distributed.launch: 2 real CPU processes (gloo) on the shapes data.

One epoch trained by 2 processes writes one checkpoint and one log.txt (rank 0 only), and its
evaluation (5 images on 2 ranks: the sampler repeats one) gives exactly the numbers of a single
process evaluating the same checkpoint. Batch size 1 keeps every image's padding identical in
both runs (padding changes the backbone mask, hence the numbers, at the last decimals).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from util.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VAL_SIZE = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_flags(data: Path) -> list[str]:
    return ["--device", "cpu", "--dataset_file", "shapes", "--data_path", str(data),
            "--shapes_train_size", "8", "--shapes_val_size", str(VAL_SIZE), "--image_scale", "0.16",
            "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
            "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1",
            "--num_queries", "10", "--num_workers", "0", "--batch_size", "1", "--print_freq", "100"]


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _eval_single_process(data: Path, checkpoint: Path, output_dir: Path) -> dict:
    """main.main in this process: no launcher environment, so no process group. One thread, as the
    launched processes (OMP_NUM_THREADS=1): CPU kernels sum in another order with more threads."""
    import main

    args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(
        _tiny_flags(data) + ["--eval", "--resume", str(checkpoint), "--output_dir", str(output_dir)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main.main(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Not generated yet: both torchrun ranks generate it at once, as on a fresh --data_path."""
    return tmp_path_factory.mktemp("data") / "shapes"


@pytest.fixture(scope="module")
def torchrun_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    proc = _run(["torchrun", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                 f"--master_port={_free_port()}", "main.py", *_tiny_flags(data), "--epochs", "1",
                 "--output_dir", str(out)])
    return out, proc


def test_rank0_alone_writes_checkpoint_and_log(torchrun_run):
    out, proc = torchrun_run
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint.pth", "checkpoint_best.pth"]
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 1, lines  # a second writer would add a second line
    assert json.loads(lines[0])["epoch"] == 0
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 0
    assert checkpoint["args"].world_size == 2 and checkpoint["args"].distributed
    # Only rank 0 prints: the start-of-training line appears once in the merged output.
    assert (proc.stdout + proc.stderr).count("Start training") == 1


def test_fresh_data_path_generated_once_by_racing_ranks(torchrun_run, data):
    assert len(list((data / "train2017").glob("*.jpg"))) == 8
    assert [p.name for p in data.parent.iterdir()] == ["shapes"]  # no temporary folder left behind


def test_two_process_eval_equals_single_process(torchrun_run, data, tmp_path):
    out, _ = torchrun_run
    logged = json.loads((out / "log.txt").read_text().splitlines()[0])["test_coco_eval_bbox"]
    stats = _eval_single_process(data, out / "checkpoint.pth", tmp_path)
    assert len(logged) == 12
    assert stats["coco_eval_bbox"] == logged


def test_torch_distributed_launch_use_env_eval_matches(torchrun_run, data, tmp_path):
    """The original's launcher (deprecated but present in torch 2.x) with --use_env, evaluating."""
    out, _ = torchrun_run
    launched, single = tmp_path / "launched", tmp_path / "single"
    _run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--use_env",
          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "main.py", *_tiny_flags(data),
          "--eval", "--resume", str(out / "checkpoint.pth"), "--output_dir", str(launched)])
    _eval_single_process(data, out / "checkpoint.pth", single)
    a = torch.load(launched / "eval.pth", weights_only=True)  # plain types only, no allow-list
    b = torch.load(single / "eval.pth", weights_only=True)
    assert list(a["params"]["imgIds"]) == list(b["params"]["imgIds"]) == list(range(1, VAL_SIZE + 1))
    # A tiny model after one epoch scores AP 0, but the score arrays still hold each category's
    # top detection score (at recall 0): the same detections were evaluated.
    assert b["scores"].max() > 0
    for key in ("precision", "recall", "scores"):
        torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]), rtol=0, atol=0)
