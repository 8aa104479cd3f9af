"""Slurm environment -> rank, world size, local rank and master address (pure parsing, plus a real 2-task join)."""
import argparse
import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from util import distributed as du

# What srun sets for task 9 of a job on 2 nodes with 8 GPUs (8 tasks) per node.
TWO_NODES_8_GPUS_TASK_9 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_JOB_NODELIST": "node[03-04]",
    "SLURM_NODELIST": "node[03-04]",
    "SLURMD_NODENAME": "node04",
}


def test_two_nodes_eight_gpus_each():
    env = du.parse_slurm_env(TWO_NODES_8_GPUS_TASK_9)
    assert env["rank"] == 9
    assert env["world_size"] == 16
    assert env["local_rank"] == 1
    assert env["master_addr"] == "node03"
    assert env["nodes"] == ["node03", "node04"]
    # Derived from the job id: the same on every task and after a requeue.
    assert env["master_port"] == 10000 + 4242
    assert du.parse_slurm_env({**TWO_NODES_8_GPUS_TASK_9, "SLURM_PROCID": "0"})["master_port"] == env["master_port"]


def test_launcher_master_address_and_port_win():
    env = du.parse_slurm_env({**TWO_NODES_8_GPUS_TASK_9, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "31000"})
    assert (env["master_addr"], env["master_port"]) == ("10.0.0.5", 31000)


def test_step_node_list_preferred_over_job_node_list():
    env = du.parse_slurm_env({**TWO_NODES_8_GPUS_TASK_9, "SLURM_STEP_NODELIST": "node04"})
    assert env["master_addr"] == "node04"


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu17", ["gpu17"]),
        ("a[1,3-4],b7", ["a1", "a3", "a4", "b7"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("x-[9-10].cluster,y", ["x-9.cluster", "x-10.cluster", "y"]),
    ],
)
def test_node_list_expansion(nodelist, hosts):
    assert du.expand_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-04", "node[04-01]", "node[a-b]", ""])
def test_bad_node_list_is_refused_by_name(nodelist):
    with pytest.raises(ValueError, match="SLURM node list"):
        du.expand_slurm_nodelist(nodelist)


def test_missing_or_inconsistent_variables_are_named():
    env = dict(TWO_NODES_8_GPUS_TASK_9)
    del env["SLURM_NTASKS"]
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        du.parse_slurm_env(env)
    with pytest.raises(ValueError, match="SLURM_PROCID=16"):
        du.parse_slurm_env({**TWO_NODES_8_GPUS_TASK_9, "SLURM_PROCID": "16"})
    with pytest.raises(ValueError, match="SLURM_NTASKS='x'"):
        du.parse_slurm_env({**TWO_NODES_8_GPUS_TASK_9, "SLURM_NTASKS": "x"})


def test_single_task_slurm_job_runs_without_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node01")
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)
    du.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)


def _slurm_task(task: int, port: int, out_dir: str) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    os.environ.update(
        SLURM_JOB_ID=str(port - 10000), SLURM_PROCID=str(task), SLURM_NTASKS="2",
        SLURM_LOCALID=str(task), SLURM_JOB_NODELIST="localhost",
    )
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)
    du.init_distributed_mode(args)
    gathered = du.all_gather(du.get_rank())
    du.cleanup()
    with open(os.path.join(out_dir, f"task{task}.json"), "w") as f:
        json.dump({"rank": args.rank, "world_size": args.world_size, "gpu": args.gpu,
                   "distributed": args.distributed, "gathered": gathered}, f)


def _free_port_from_10000() -> int:
    # The port is derived from SLURM_JOB_ID (10000 + id % 20000): pick a job id whose port is free.
    for port in range(20000 + os.getpid() % 5000, 29999):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def test_two_slurm_tasks_join_one_process_group(tmp_path):
    mp.spawn(_slurm_task, args=(_free_port_from_10000(), str(tmp_path)), nprocs=2, join=True)
    for task in range(2):
        res = json.loads((tmp_path / f"task{task}.json").read_text())
        assert res == {"rank": task, "world_size": 2, "gpu": task, "distributed": True, "gathered": [0, 1]}
