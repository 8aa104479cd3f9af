"""The timing helpers every benchmark uses: flags, machine description, interleaved rounds, medians and
ratios, peak memory, the printed table and the JSON file.

Modes run side by side in one process, round by round (A, B, C, A, B, C, ...), so that load from other
processes hits every mode alike; the first rounds are warm-up; medians of the others are reported.
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
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # The scripts run as `python benchmarks/bench_x.py`; the project's packages live one level up.
    sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "benchmarks" / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every benchmark accepts: --device, --quick, --out, --warmup, --repeats, --threads, --cpu-time."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny configuration (smoke test); figures mean nothing")
    parser.add_argument("--out", default=None, help="JSON file to write (default: benchmarks/results/<name>.json)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds before the timed ones")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time this process's CPU time, not the wall clock")
    return parser


def setup(args: argparse.Namespace, warmup: int, repeats: int) -> tuple[torch.device, int, int, dict[str, Any]]:
    """Apply --threads, check --device, print the machine. Returns (device, warm-up rounds, timed rounds,
    machine description); the rounds are --warmup/--repeats where given, else the script's defaults."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    device = torch.device(args.device)
    return (device, warmup if args.warmup is None else args.warmup, repeats if args.repeats is None else args.repeats,
            machine_info(device))


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on; printed, and stored in every JSON."""
    import torchvision

    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "torchvision": torchvision.__version__,
                            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32"] = {"conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    return info


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(modes: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     device: torch.device = torch.device("cpu"), cpu_time: bool = False) -> dict[str, list[float]]:
    """Run warmup + repeats rounds, each calling every mode once in turn; return {mode: [seconds per timed call]}.

    cpu_time: time with time.process_time (this process's CPU time) instead of time.perf_counter."""
    timer = time.process_time if cpu_time else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in modes}
    for round_index in range(warmup + repeats):
        for name, fn in modes.items():
            sync(device)
            start = timer()
            fn()
            sync(device)
            if round_index >= warmup:
                times[name].append(timer() - start)
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, Any]]:
    """{mode: {median_s, speedup (baseline's median / this mode's), times_s}}."""
    base = statistics.median(times[baseline])
    return {name: {"median_s": statistics.median(t), "speedup": base / statistics.median(t), "times_s": t}
            for name, t in times.items()}


def print_table(title: str, rows: dict[str, dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as a table: one line per mode, columns given as (heading, row key, format spec)."""
    print(f"\n{title}", flush=True)
    widths = [max(len(heading), 9) for heading, _, _ in columns]
    print(f"{'mode':26s} " + " ".join(f"{h:>{w}s}" for (h, _, _), w in zip(columns, widths)))
    for name, row in rows.items():
        cells = [format(row[key], spec) if row.get(key) is not None else "-" for _, key, spec in columns]
        print(f"{name:26s} " + " ".join(f"{c:>{w}s}" for c, w in zip(cells, widths)), flush=True)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference of pred_logits and pred_boxes (compared in fp32)."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in ("pred_logits", "pred_boxes"))


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (VmHWM); a no-op where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mb(field: str = "VmHWM") -> float | None:
    """VmHWM (peak, default) or VmRSS (current) of this process in MiB, from /proc/self/status; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def write_json(name: str, args: argparse.Namespace, info: dict[str, Any], config: dict[str, Any], results: Any,
               **extra: Any) -> Path:
    """Write benchmark, machine, quick, config and results to --out (default benchmarks/results/<name>.json)."""
    path = Path(args.out) if args.out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": info, "quick": args.quick, "config": config, "results": results, **extra}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def print_profile(name: str, fn: Callable[[], object], device: torch.device, rows: int = 15) -> str:
    """torch.profiler's operator table (sorted by self time) of one call of fn; printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows)
    print(f"\nprofile of {name}:\n{table}", flush=True)
    return table
