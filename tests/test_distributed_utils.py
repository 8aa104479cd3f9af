"""util.distributed on 2 real gloo processes: env set-up, all_gather, reduce_dict, main-only printing."""
import argparse
import contextlib
import io
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from util import distributed as du


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, world_size: int, port: int, out_dir: str) -> None:
    # What torchrun puts in each process's environment.
    os.environ.update(
        RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        du.init_distributed_mode(args)
        print("plain print")
        print("forced print", force=True)
        gathered = du.all_gather({"rank": du.get_rank(), "ids": list(range(local_rank + 1))})
        mean = du.reduce_dict({"b": torch.tensor(float(local_rank)), "a": torch.tensor(10.0 * (local_rank + 1))})
        total = du.reduce_dict({"a": torch.tensor(10.0 * (local_rank + 1))}, average=False)
        main = du.is_main_process()
        du.cleanup()
        initialised_after_cleanup = du.is_dist_avail_and_initialized()
    result = {
        "args": {k: getattr(args, k) for k in ("rank", "world_size", "gpu", "distributed", "dist_backend")},
        "stdout": captured.getvalue(),
        "gathered": gathered,
        "mean": {k: v.item() for k, v in mean.items()},
        "total": total["a"].item(),
        "main": main,
        "initialised_after_cleanup": initialised_after_cleanup,
    }
    with open(os.path.join(out_dir, f"rank{local_rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_env_launch_sets_args(two_process_results):
    for rank, res in enumerate(two_process_results):
        assert res["args"] == {"rank": rank, "world_size": 2, "gpu": rank, "distributed": True, "dist_backend": "gloo"}
        assert res["main"] == (rank == 0)
        assert res["initialised_after_cleanup"] is False


def test_only_main_process_prints_unless_forced(two_process_results):
    main, other = (r["stdout"] for r in two_process_results)
    assert "plain print" in main and "forced print" in main
    assert "plain print" not in other
    assert "forced print" in other


def test_all_gather_returns_every_rank_in_order(two_process_results):
    expected = [{"rank": 0, "ids": [0]}, {"rank": 1, "ids": [0, 1]}]
    for res in two_process_results:
        assert res["gathered"] == expected


def test_reduce_dict_averages_or_sums(two_process_results):
    for res in two_process_results:
        assert res["mean"] == {"a": 15.0, "b": 0.5}
        assert res["total"] == 30.0


def test_single_process_without_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)
    du.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu, args.dist_backend) == (False, 0, 1, 0, "gloo")
    assert du.get_world_size() == 1 and du.get_rank() == 0 and du.is_main_process()
    assert du.all_gather([1, 2]) == [[1, 2]]
    stats = {"loss": torch.tensor(2.5)}
    assert du.reduce_dict(stats) is stats


def test_nccl_chosen_only_when_cuda_is_used(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = argparse.Namespace(device="cuda", dist_url="env://", world_size=1)
    du.init_distributed_mode(args)
    assert args.dist_backend == "nccl"
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)
    du.init_distributed_mode(args)
    assert args.dist_backend == "gloo"


def _fake_cuda_launch(monkeypatch, local_rank: int, visible_gpus: int) -> list:
    """Rank 1 of 2 under torchrun on a CUDA machine, with the process group calls recorded, not made."""
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible_gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(du.dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(du.dist, "barrier", lambda *a, **kw: calls.append(("barrier",)))
    return calls


def test_cuda_process_uses_its_local_gpu_and_nccl(monkeypatch):
    calls = _fake_cuda_launch(monkeypatch, local_rank=1, visible_gpus=8)
    args = argparse.Namespace(device="cuda", dist_url="env://", world_size=1)
    try:
        du.init_distributed_mode(args)
    finally:
        du.cleanup()
    assert (args.rank, args.world_size, args.gpu, args.dist_backend) == (1, 2, 1, "nccl")
    assert calls[0] == ("set_device", 1)
    assert calls[1] == ("init", {"backend": "nccl", "init_method": "env://", "world_size": 2, "rank": 1,
                                 "device_id": torch.device("cuda", 1)})
    assert calls[2] == ("barrier",)


def test_one_bound_gpu_per_process_and_missing_gpu(monkeypatch):
    calls = _fake_cuda_launch(monkeypatch, local_rank=3, visible_gpus=1)  # srun --gpus-per-task=1
    args = argparse.Namespace(device="cuda", dist_url="env://", world_size=1)
    try:
        du.init_distributed_mode(args)
    finally:
        du.cleanup()
    assert args.gpu == 0 and calls[0] == ("set_device", 0)
    _fake_cuda_launch(monkeypatch, local_rank=3, visible_gpus=2)
    with pytest.raises(RuntimeError, match="local rank 3 has no GPU: only 2 visible"):
        du.init_distributed_mode(argparse.Namespace(device="cuda", dist_url="env://", world_size=1))
