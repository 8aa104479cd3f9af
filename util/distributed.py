"""Process-group set-up and the few collective helpers DETR needs.

Three ways a run can start, tried in this order by `init_distributed_mode(args)`:
- torchrun or `python -m torch.distributed.launch --use_env`: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT are in the environment.
- Slurm (`srun`, or submitit without its own exports): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
  and the node list; the master is the first host of the node list (`parse_slurm_env`).
- Anything else, or a world of one process: no process group, `args.distributed = False`.

Backend: nccl when the run uses CUDA, gloo otherwise (CPU runs, CI).
All helpers below also work when no process group exists (they act as a world of one).
"""
from __future__ import annotations

import builtins
import os
import re
from typing import Any, Mapping

import torch
import torch.distributed as dist

DEFAULT_MASTER_PORT = 29500


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names in order.

    "node[03-04]" -> ["node03", "node04"]; "a[1,3-4],b7" -> ["a1", "a3", "a4", "b7"];
    several bracket groups in one name expand as a product ("r[1-2]n[1-2]" -> r1n1, r1n2, r2n1, r2n2).
    Zero padding of the lower bound is kept ("n[008-010]" -> n008, n009, n010).
    """
    hosts: list[str] = []
    for pattern in _split_outside_brackets(nodelist.strip()):
        hosts.extend(_expand_host_pattern(pattern, nodelist))
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_host_pattern(pattern: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"SLURM node list {whole!r}: unbalanced brackets in {pattern!r}")
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    expanded = []
    for item in match.group(1).split(","):
        bounds = item.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers = [bounds[0]]
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            low, high = int(bounds[0]), int(bounds[1])
            if high < low:
                raise ValueError(f"SLURM node list {whole!r}: range {item!r} runs backwards")
            width = len(bounds[0])
            numbers = [str(n).zfill(width) for n in range(low, high + 1)]
        else:
            raise ValueError(f"SLURM node list {whole!r}: cannot read range {item!r} (expected N or N-M)")
        for number in numbers:
            expanded.extend(_expand_host_pattern(head + number + tail, whole))
    return expanded


def _required_int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None:
        raise ValueError(f"Slurm environment: {name} is not set (is this process started by srun?)")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Slurm environment: {name}={value!r} is not an integer") from None


def parse_slurm_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Read a Slurm task's environment; pure function (pass `os.environ` or a dict).

    Returns {'rank', 'world_size', 'local_rank', 'master_addr', 'master_port', 'nodes'}:
    rank = SLURM_PROCID, world_size = SLURM_NTASKS, local_rank = SLURM_LOCALID, nodes = the
    expanded node list of the step (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST, else
    SLURM_NODELIST), master_addr = its first host (MASTER_ADDR wins if already set),
    master_port = MASTER_PORT if set, else 10000 + SLURM_JOB_ID % 20000 (the same for every task
    of the job, and for the job after a requeue), else 29500.
    """
    rank = _required_int(environ, "SLURM_PROCID")
    world_size = _required_int(environ, "SLURM_NTASKS")
    local_rank = int(environ.get("SLURM_LOCALID", "0"))
    if not 0 <= rank < world_size:
        raise ValueError(f"Slurm environment: SLURM_PROCID={rank} is outside 0..SLURM_NTASKS-1={world_size - 1}")
    nodelist = next(
        (environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(k)),
        None,
    )
    nodes = expand_slurm_nodelist(nodelist) if nodelist else []
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    elif nodes:
        master_addr = nodes[0]
    elif world_size == 1:
        master_addr = "127.0.0.1"
    else:
        raise ValueError("Slurm environment: no SLURM_JOB_NODELIST to find the master node, and no MASTER_ADDR")
    if "MASTER_PORT" in environ:
        master_port = int(environ["MASTER_PORT"])
    elif environ.get("SLURM_JOB_ID", "").isdigit():
        master_port = 10000 + int(environ["SLURM_JOB_ID"]) % 20000
    else:
        master_port = DEFAULT_MASTER_PORT
    return {
        "rank": rank,
        "world_size": world_size,
        "local_rank": local_rank,
        "master_addr": master_addr,
        "master_port": master_port,
        "nodes": nodes,
    }


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def save_on_master(*args: Any, **kwargs: Any) -> None:
    """`torch.save` on the main process only (the original's helper; new code uses util.checkpoint)."""
    if is_main_process():
        torch.save(*args, **kwargs)


_builtin_print = builtins.print


def setup_for_distributed(is_master: bool) -> None:
    """Silence `print` on every process but the main one; `print(..., force=True)` always prints."""

    def print(*args: Any, force: bool = False, **kwargs: Any) -> None:
        if is_master or force:
            _builtin_print(*args, **kwargs)

    builtins.print = print


def init_distributed_mode(args) -> None:
    """Join the process group this process was launched into, or note there is none.

    Reads the environment (see the module docstring) and `args.device`, `args.dist_url`
    ('env://' by default; a 'file://' or 'tcp://' URL is used as given) and `args.world_size`.
    Sets args.distributed, args.rank, args.world_size, args.gpu (local device index) and
    args.dist_backend; selects the CUDA device, waits for every process, and leaves `print`
    active on the main process only.
    """
    environ = os.environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        args.rank = int(environ["RANK"])
        args.world_size = int(environ["WORLD_SIZE"])
        args.gpu = int(environ.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in environ:
        slurm = parse_slurm_env(environ)
        args.rank, args.world_size, args.gpu = slurm["rank"], slurm["world_size"], slurm["local_rank"]
        # env:// reads these; set them only where the launcher did not.
        environ.setdefault("MASTER_ADDR", slurm["master_addr"])
        environ.setdefault("MASTER_PORT", str(slurm["master_port"]))
    else:
        if getattr(args, "world_size", 1) > 1:
            print(f"--world_size {args.world_size} ignored: no launcher environment (use torchrun or srun)")
        args.rank, args.world_size, args.gpu = 0, 1, 0

    use_cuda = str(getattr(args, "device", "cpu")).startswith("cuda") and torch.cuda.is_available()
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if not getattr(args, "dist_url", None):
        args.dist_url = "env://"
    if args.world_size == 1:
        args.distributed = False
        return

    args.distributed = True
    device_id = None
    if use_cuda:
        visible = torch.cuda.device_count()
        if visible == 1:
            args.gpu = 0  # the launcher bound one GPU to this process (e.g. srun --gpus-per-task=1)
        elif args.gpu >= visible:
            raise RuntimeError(
                f"local rank {args.gpu} has no GPU: only {visible} visible "
                "(start at most one process per GPU, or check CUDA_VISIBLE_DEVICES)"
            )
        torch.cuda.set_device(args.gpu)
        device_id = torch.device("cuda", args.gpu)
    print(f"| distributed init (rank {args.rank}/{args.world_size}, {args.dist_backend}): {args.dist_url}", flush=True)
    dist.init_process_group(
        backend=args.dist_backend,
        init_method=args.dist_url,
        world_size=args.world_size,
        rank=args.rank,
        device_id=device_id,
    )
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def cleanup() -> None:
    """Leave the process group (end of main), so every process exits without hanging."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
    builtins.print = _builtin_print


def all_gather(data: Any) -> list[Any]:
    """Every process's picklable `data`, in rank order (a one-element list without a process group).

    Works on gloo and nccl (nccl moves the pickled bytes through the current CUDA device).
    """
    world_size = get_world_size()
    if world_size == 1:
        return [data]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, data)
    return gathered


def reduce_dict(input_dict: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Sum (or average) scalar tensors of the same keys over all processes; every process gets the result."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict)  # the same order on every process
        values = torch.stack([input_dict[k].detach().reshape(()) for k in names])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))
