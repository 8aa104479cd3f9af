"""Shared pieces of the benchmarks: flags, machine description, timing, peak memory, JSON output.

Every benchmark compares its modes side by side in one process: the modes are run in turn
(A, B, C, A, B, C, ...) so that load from other processes on a shared machine hits all of
them alike, warm-up runs are excluded, and the median of the timed runs is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # The scripts run as `python benchmarks/bench_x.py`; the project's packages live one level up.
    sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "benchmarks" / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every benchmark accepts: --device, --quick, --out, --warmup, --repeats, --threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration (smoke test, seconds); figures are not meaningful")
    parser.add_argument("--out", default=None,
                        help="JSON file to write (default: benchmarks/results/<name>.json)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per mode")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per mode (median reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time instead of the wall clock: on a shared machine "
                             "it leaves out the time other processes hold the core (use with --threads 1)")
    return parser


def clock(args: argparse.Namespace) -> Callable[[], float]:
    """The timer --cpu-time asks for: time.process_time, else time.perf_counter."""
    return time.process_time if getattr(args, "cpu_time", False) else time.perf_counter


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads, check --device, and return the torch device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(args.device)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    """What the figures were measured on: CPU, cores, threads, torch/torchvision versions, device."""
    import torchvision

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_machine(info: dict) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(modes: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     device: torch.device, timer: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Run each mode `warmup` times untimed, then `repeats` rounds of one run per mode in turn.

    Returns {mode: [seconds per timed run]} as `timer` measures them (wall clock by default).
    """
    for fn in modes.values():
        for _ in range(warmup):
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(repeats):
        for name, fn in modes.items():
            sync(device)
            start = timer()
            fn()
            sync(device)
            times[name].append(timer() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (VmHWM). Returns False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (VmHWM in /proc/self/status); None off Linux."""
    return _status_mb("VmHWM")


def rss_mb() -> float | None:
    """Current resident set size of this process in MiB (VmRSS); None off Linux."""
    return _status_mb("VmRSS")


def write_json(name: str, payload: dict, out: str | None) -> Path:
    """Write the figures to --out (or benchmarks/results/<name>.json) and return the path."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 keys: tuple[str, ...] = ("pred_logits", "pred_boxes")) -> float:
    """Largest absolute difference over the given output tensors (compared in fp32)."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def profile_table(name: str, fn: Callable[[], object], rows: int, device: torch.device) -> str:
    """torch.profiler operator table (sorted by self time) of one call of fn; printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows)
    print(f"\nprofile of {name}:\n{table}", flush=True)
    return table
