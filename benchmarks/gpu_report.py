"""One short guarded run on one CUDA GPU that answers the project's GPU questions, as one JSON and one markdown file.

    python benchmarks/gpu_report.py                        # on the GPU machine, within --budget-s
    python benchmarks/gpu_report.py --device cpu --quick   # dry run, tiny model (tests/test_gpu_report.py)

Sections, cheap and essential first: environment; cuda_tests (pytest -m cuda); inference (detr_resnet50
800x1066, batch 1 and 8: plain fp32, then optimize_for_inference in fp32, TF32, bf16, fp16 autocast);
training (batch 2 and 4: plain fp32, optimize_for_training in fp32 and bf16); torchrun_nccl (an NCCL
group and one DDP step under torchrun); compile (torch.compile of the fast path, compile time apart).
Each mode's first call is its warm-up (and gives peak memory); then the modes run in interleaved rounds
(benchmarks/common.py). Every section and row is guarded: an error, or the budget spent (SIGALRM), is
recorded and the run goes on; the JSON and markdown in --out-dir are rewritten after every section.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_inference import make_runner  # noqa: E402
from bench_train_step import make_step  # noqa: E402
from common import ROOT, machine_info, max_abs_diff, summarize, sync, time_interleaved  # noqa: E402
from detr_setup import FULL, QUICK, build_criterion, build_detr, random_images, random_targets  # noqa: E402
from fast import optimize_for_inference, optimize_for_training  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


class SectionTimeout(Exception):
    """Raised by SIGALRM when a section runs past the run's time budget."""


class Report:
    """The run's JSON, its time budget, and the guarded execution of its sections."""

    def __init__(self, out_dir: Path, budget_s: float, meta: dict[str, Any]):
        self.out_dir, self.budget_s, self.start = out_dir, budget_s, time.monotonic()
        self.data: dict[str, Any] = {"meta": {**meta, "budget_s": budget_s}, "sections": {}}
        out_dir.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def section(self, name: str, fn: Callable[[dict], Any], needs_s: float) -> dict:
        """Run fn(record) if `needs_s` seconds of budget are left; record status (ok, error, timeout,
        skipped), seconds and error. fn fills `record` as it goes, so a timeout keeps the rows measured."""
        record: dict[str, Any] = {"status": "running"}
        self.data["sections"][name] = record
        left = self.remaining()
        if left < needs_s:
            record.update(status="skipped", reason=f"budget: {left:.0f} s left, needs ~{needs_s:.0f} s")
            return self.write() or record

        def expire(signum, frame):
            raise SectionTimeout(f"time budget of {self.budget_s:.0f} s spent")

        began = time.monotonic()
        print(f"== {name} ({left:.0f} s of budget left)", flush=True)
        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, left)
        try:
            record.update(fn(record) or {}, status="ok")
        except SectionTimeout as err:
            record.update(status="timeout", error=str(err))
        except Exception:  # any failure is a finding to report, never the end of the run
            record.update(status="error", error=traceback.format_exc()[-3000:])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        record["seconds"] = round(time.monotonic() - began, 2)
        print(f"   {name}: {record['status']} in {record['seconds']} s", flush=True)
        return self.write() or record

    def write(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self.start, 2)
        (self.out_dir / "gpu_report.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        (self.out_dir / "gpu_report.md").write_text(markdown(self.data))


def attempt(rows: dict, key: str, fn: Callable[[], dict]) -> bool:
    """rows[key] = fn(), or {'error': traceback} if it raises (a timeout still ends the section); True if it ran."""
    try:
        rows[key] = fn()
    except SectionTimeout:
        rows[key] = {"error": "time budget spent"}
        raise
    except Exception:
        rows[key] = {"error": traceback.format_exc()[-3000:]}
    print(f"   {key}: " + (rows[key]["error"].strip().splitlines()[-1][:200] if "error" in rows[key] else "ok"),
          flush=True)
    return "error" not in rows[key]


def in_precision(fn: Callable[[], Any], name: str, device: torch.device) -> Callable[[], Any]:
    """fn run in fp32 (TF32 off), tf32 (TF32 matmuls and convolutions), or bf16 / fp16 autocast."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)

    def run() -> Any:
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
        try:
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                return fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    return run


def measure(rows: dict, modes: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
            per: int) -> None:
    """First call of each mode (first_call_s, peak memory; a mode that fails is recorded and left out), then the
    others interleaved: rows[mode] gets median_s, ms per item (`per` items a call) and speed-up over the first."""
    timed = {}
    for key, fn in modes.items():
        def first(fn=fn) -> dict:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            began = time.perf_counter()
            fn()
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            return {"first_call_s": time.perf_counter() - began, "peak_memory_mb": peak}

        if attempt(rows, key, first):
            timed[key] = fn
    if timed:
        for key, row in summarize(time_interleaved(timed, warmup, repeats, device), next(iter(timed))).items():
            rows[key].update(row, ms_per_item=1000 * row["median_s"] / per)


def inference(record: dict, args, device: torch.device) -> None:
    shape = QUICK if args.quick else FULL
    plain = build_detr(shape, aux_loss=False).eval().to(device)
    fast = optimize_for_inference(copy.deepcopy(plain))
    rows = record.setdefault("rows", {})
    for batch in ((1, 2) if args.quick else (1, 8)):
        images = random_images(shape, batch).to(device)
        runners = {f"plain fp32 | b{batch}": make_runner(plain, images, torch.no_grad)}
        modes = {f"plain fp32 | b{batch}": in_precision(runners[f"plain fp32 | b{batch}"], "fp32", device)}
        for name in PRECISIONS:
            key = f"fast {name} | b{batch}"
            if device.type != "cuda" and name in ("tf32", "fp16"):
                rows[key] = {"skipped": f"{name}: a CUDA mode"}
                continue
            runners[key] = make_runner(fast, images.contiguous(memory_format=torch.channels_last))
            modes[key] = in_precision(runners[key], name, device)
        measure(rows, modes, device, 1, 2 if args.quick else 10, batch)
        for key, runner in runners.items():
            if "error" not in rows[key]:
                rows[key]["max_abs_diff"] = max_abs_diff(runner.last, runners[f"plain fp32 | b{batch}"].last)


def training(record: dict, args, device: torch.device) -> None:
    shape = QUICK if args.quick else FULL
    criterion = build_criterion(shape).to(device)
    rows = record.setdefault("rows", {})
    for batch in ((1, 2) if args.quick else (2, 4)):
        images = random_images(shape, batch).to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(shape, batch)]

        def model(fast: bool) -> torch.nn.Module:
            built = build_detr(shape, aux_loss=True).to(device)
            # torch's dropout in both, so that the first losses compare (the sparse one is CPU-only anyway)
            return optimize_for_training(built, sparse_dropout=False) if fast else built

        steps = {f"plain fp32 | b{batch}": make_step(model(False), criterion, images, targets),
                 f"fast fp32 | b{batch}": make_step(model(True), criterion, images, targets),
                 f"fast bf16 | b{batch}": make_step(model(True), criterion, images, targets, torch.bfloat16)}
        measure(rows, {key: in_precision(step, "fp32", device) for key, step in steps.items()}, device, 0,
                2 if args.quick else 3, 1)
        for key, step in steps.items():
            if step.record["losses"]:
                rows[key]["first_loss"] = step.record["losses"][0]


def compiled(record: dict, args, device: torch.device) -> None:
    shape = QUICK if args.quick else FULL
    backend = "eager" if args.quick and device.type == "cpu" else "inductor"  # inductor on a CPU takes minutes
    record["backend"] = backend
    rows = record.setdefault("rows", {})
    fast = optimize_for_inference(build_detr(shape, aux_loss=False).eval().to(device))
    images = random_images(shape, 1).to(device).contiguous(memory_format=torch.channels_last)
    measure(rows, {"fast bf16 eager | b1": in_precision(make_runner(fast, images), "bf16", device),
                   "fast bf16 compile | b1": in_precision(make_runner(torch.compile(fast, backend=backend), images),
                                                          "bf16", device)}, device, 1, 2 if args.quick else 10, 1)
    trained = optimize_for_training(build_detr(shape, aux_loss=True).to(device), sparse_dropout=False)
    step_images = random_images(shape, 2).to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in random_targets(shape, 2)]
    step = make_step(torch.compile(trained, backend=backend), build_criterion(shape).to(device), step_images, targets)
    measure(rows, {"fast fp32 train compile | b2": in_precision(step, "fp32", device)}, device, 0,
            2 if args.quick else 3, 1)
    for key, row in rows.items():
        if " compile |" in key and "median_s" in row:
            row["compile_s"] = row["first_call_s"] - row["median_s"]


def run_python(record: dict, report: Report, *command: str) -> subprocess.CompletedProcess:
    """`python command...` in the repository root, within the budget left; its output tail is recorded."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=max(10.0, min(150.0, report.remaining() - 5)))
    record.update(command=" ".join(command), returncode=proc.returncode,
                  output_tail=(proc.stdout + proc.stderr)[-1500:])
    return proc


def cuda_tests(record: dict, report: Report) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    proc = run_python(record, report, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda and not slow", *files)
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", (proc.stdout + proc.stderr)[-4000:])
    return {"counts": {kind: int(n) for n, kind in found}}


def torchrun_nccl(record: dict, report: Report, device: torch.device) -> dict:
    proc = run_python(record, report, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                      str(Path(__file__).resolve()), "--nccl-probe", "--device", str(device))
    found = re.findall(r"^NCCL_PROBE (\{.*\})$", proc.stdout, flags=re.M)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"torchrun exited {proc.returncode}:\n{record['output_tail']}")
    return json.loads(found[-1])


def nccl_probe(device_name: str) -> None:
    """Under torchrun: a process group (NCCL on CUDA, gloo on CPU), an all_reduce and one DDP training step."""
    import torch.distributed as dist

    device = torch.device(device_name, int(os.environ["LOCAL_RANK"])) if device_name == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    value = torch.ones(1, device=device)
    dist.all_reduce(value)
    model = build_detr(QUICK, aux_loss=True).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step = make_step(ddp, build_criterion(QUICK).to(device), random_images(QUICK, 2).to(device),
                     [{k: v.to(device) for k, v in t.items()} for t in random_targets(QUICK, 2)])
    step()
    result = {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
              "all_reduce_ok": value.item() == dist.get_world_size(), "ddp_step_loss": step.record["losses"][0]}
    dist.destroy_process_group()
    print("NCCL_PROBE " + json.dumps(result), flush=True)


def markdown(data: dict) -> str:
    """The sections' status table, then one table of rows per measuring section."""
    sections, meta = data["sections"], data["meta"]
    env = sections.get("environment", {})
    lines = [f"# GPU report: {env.get('gpu', env.get('device'))}, torch {env.get('torch')}, CUDA {env.get('cuda')}; "
             f"quick={meta.get('quick')}, budget {meta['budget_s']} s, elapsed {meta.get('elapsed_s')} s", "",
             "| section | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, rec in sections.items():
        note = ", ".join(f"{v} {k}" for k, v in rec.get("counts", {}).items()) or rec.get("reason") or \
            (rec.get("error", "").strip().splitlines() or [""])[-1][:150]
        lines.append(f"| {name} | {rec.get('status')} | {rec.get('seconds', '-')} | {note} |")
    fields = [("ms/item", "ms_per_item", ".2f"), ("speed-up", "speedup", ".2f"),
              ("peak MiB", "peak_memory_mb", ".0f"), ("max abs diff", "max_abs_diff", ".1e"),
              ("first loss", "first_loss", ".5f"), ("compile s", "compile_s", ".1f")]
    for name, rec in sections.items():
        if not rec.get("rows"):
            continue
        lines += ["", f"## {name}", "", "| mode | batch | " + " | ".join(t for t, _, _ in fields) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in fields) + " |"]
        for key, row in rec["rows"].items():
            mode, _, batch = key.partition(" | ")
            if "error" in row or "skipped" in row:
                why = row.get("skipped") or "error: " + row["error"].strip().splitlines()[-1][:120]
                lines.append(f"| {mode} | {batch} | {why} |" + " |" * (len(fields) - 1))
            else:
                cells = [format(row[k], s) if row.get(k) is not None else "-" for _, k, s in fields]
                lines.append(f"| {mode} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny model and images: checks the script, not speed")
    parser.add_argument("--budget-s", type=float, default=240.0, help="time budget of the whole run (default 240)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where the JSON and .md go")
    parser.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nccl_probe:
        return nccl_probe(args.device)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; --device cpu --quick is the dry run")
    report = Report(Path(args.out_dir), args.budget_s, {"quick": args.quick, "command": " ".join(sys.argv)})
    quick = args.quick  # the dry run's sections need less time
    plan: list[tuple[str, Callable[[dict], Any], float]] = [
        ("environment", lambda rec: {**machine_info(device), "cuda": torch.version.cuda}, 0),
        ("cuda_tests", lambda rec: cuda_tests(rec, report), 15),
        ("inference", lambda rec: inference(rec, args, device), 5 if quick else 40),
        ("training", lambda rec: training(rec, args, device), 5 if quick else 40),
        ("torchrun_nccl", lambda rec: torchrun_nccl(rec, report, device), 10 if quick else 30),
        ("compile", lambda rec: compiled(rec, args, device), 10 if quick else 90),
    ]
    for name, fn, needs_s in plan:
        report.section(name, fn, needs_s)
    report.write()
    print(markdown(report.data), flush=True)
    print(f"wrote {report.out_dir / 'gpu_report.json'} and {report.out_dir / 'gpu_report.md'}", flush=True)


if __name__ == "__main__":
    main()
