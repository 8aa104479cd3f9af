"""One short run on one CUDA GPU that answers every GPU question of the project, in one JSON and one markdown table.

    python benchmarks/gpu_report.py                        # on the GPU machine: <= 6 minutes
    python benchmarks/gpu_report.py --device cpu --quick   # dry run, tiny sizes (tests/test_gpu_report.py)

Sections, in this order (cheap and essential first, torch.compile last):
  environment       GPU name, driver, torch / CUDA / cuDNN versions, capability, memory
  cuda_tests        the tests marked `cuda` (pytest in a subprocess): passed / failed / skipped
  inference_eager   detr_resnet50 800x1066 at batch 1 and 8: the plain model in fp32 (the
                    baseline), then models.fuse.optimize_for_inference in fp32, TF32, bf16 and fp16
                    autocast; ms per image, peak memory, max |diff| from the baseline
  training_eager    one training step (engine.train_one_epoch: forward, loss, backward, clipping,
                    AdamW) at batch 2 and 4: fp32 as built, fp32 as main.py trains by default
                    (optimize_for_training), --amp bf16; s per step, peak memory, first loss
  torchrun_nccl     `torchrun --nproc_per_node 1` of this script's --nccl-probe: an NCCL process
                    group, one DDP training step, then main.py's one shapes epoch with the group
                    alive (its loss reduction, metric sync and evaluation gather go through NCCL)
  compile           torch.compile of the inference modes (bf16 first) and of the training step
                    (main.py --compile), each with its compile time (the first call) apart
Each section and each row is its own try/except: an error is recorded (with its traceback) and the
run goes on. A time budget (--budget-s, default 330 s) guards the whole run: a section starts only
if its estimated time is left, and a SIGALRM stops one that overruns; the JSON and the markdown
are rewritten after every section, so even a killed run leaves its figures.
Outputs: OUT/gpu_report.json and OUT/gpu_report.md (OUT: --out-dir, default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from detr_setup import FULL, QUICK, DetrShape, build_criterion, build_detr, random_images, random_targets  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TARGET_MS_PER_IMAGE_B1 = 10.0  # H100-class, fastest mode (the original's published V100 figure: 36 ms)
TARGET_TRAIN_SPEEDUP = 2.5  # fastest training step over fp32 eager
TINY_MAIN_FLAGS = ["--dataset_file", "shapes", "--shapes_train_size", "4", "--shapes_val_size", "2",
                   "--image_scale", "0.16", "--backbone", "resnet18", "--backbone_weights", "none",
                   "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2", "--enc_layers", "1",
                   "--dec_layers", "1", "--num_queries", "8", "--num_workers", "0", "--batch_size", "2",
                   "--print_freq", "100", "--epochs", "1"]


class SectionTimeout(Exception):
    """Raised by SIGALRM when a section runs past the run's time budget."""


def _short_traceback() -> str:
    return traceback.format_exc()[-3000:]


class Report:
    """The run's JSON, its time budget, and the guarded execution of sections and rows."""

    def __init__(self, out_dir: Path, budget_s: float, meta: dict[str, Any]):
        self.out_dir = out_dir
        self.budget_s = budget_s
        self.start = time.monotonic()
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}
        out_dir.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    @contextlib.contextmanager
    def _alarm(self, seconds: float):
        """SIGALRM after `seconds` (main thread, POSIX); a no-op where signals are not available."""
        usable = hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) is not None
        if not usable or seconds <= 0:
            yield
            return

        def expire(signum, frame):
            raise SectionTimeout(f"time budget of {self.budget_s:.0f} s spent")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def section(self, name: str, fn: Callable[[dict], Any], needs_s: float) -> dict:
        """Run fn(record) if `needs_s` seconds of budget are left; record status, seconds, error.

        fn fills `record` as it goes (so a timeout keeps the rows already measured) and may return
        extra fields. Status: ok, error (traceback kept), timeout, skipped (with the reason).
        """
        record: dict[str, Any] = {"status": "running"}
        self.data["sections"][name] = record
        left = self.remaining()
        if left < needs_s:
            record.update(status="skipped", reason=f"budget: {left:.0f} s left, needs ~{needs_s:.0f} s")
            self.write()
            return record
        began = time.monotonic()
        print(f"== {name} ({left:.0f} s of budget left)", flush=True)
        try:
            with self._alarm(left):
                extra = fn(record)
            record.update(extra or {})
            record["status"] = "ok"
        except SectionTimeout as err:
            record.update(status="timeout", error=str(err))
        except Exception:  # any failure is a finding to report, never the end of the run
            record.update(status="error", error=_short_traceback())
        record["seconds"] = round(time.monotonic() - began, 2)
        print(f"   {name}: {record['status']} in {record['seconds']} s", flush=True)
        self.write()
        return record

    def write(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self.start, 2)
        (self.out_dir / "gpu_report.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        (self.out_dir / "gpu_report.md").write_text(markdown(self.data))


def attempt(rows: dict, key: str, fn: Callable[[], dict]) -> None:
    """rows[key] = fn(), or {'error': traceback} if it raises (a timeout still ends the section)."""
    try:
        rows[key] = fn()
    except SectionTimeout:
        rows[key] = {"error": "time budget spent"}
        raise
    except Exception:
        rows[key] = {"error": _short_traceback()}
    print(f"   {key}: {_brief(rows[key])}", flush=True)


def _brief(row: dict) -> str:
    if "error" in row:
        return "ERROR " + row["error"].strip().splitlines()[-1][:200]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                     if not isinstance(v, (list, dict)))


# ---------------------------------------------------------------------------------------------
# Helpers: device, precision, timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def cuda_only(name: str, device: torch.device) -> bool:
    """TF32 is a CUDA setting; fp16 autocast is CUDA-only here (engine.autocast_context refuses it on CPU)."""
    return device.type != "cuda" and name in ("tf32", "fp16")


@contextlib.contextmanager
def precision(name: str, device: torch.device):
    """fp32 (TF32 off), tf32 (TF32 matmuls and convolutions), bf16 / fp16 autocast."""
    if cuda_only(name, device):
        raise ValueError(f"{name} is a CUDA mode")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    amp = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[name])
           if name in ("bf16", "fp16") else contextlib.nullcontext())
    try:
        with amp:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> tuple[list[float], Any]:
    """(seconds of each timed call, the last result) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - began)
    return times, out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in ("pred_logits", "pred_boxes"))


# ---------------------------------------------------------------------------------------------
# Sections


def environment(device: torch.device) -> dict:
    import torchvision

    info: dict[str, Any] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                            "python": platform.python_version(), "cuda_runtime": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "cpu_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
            info["driver"] = query.stdout.strip().splitlines()[device.index or 0].split(",")[-1].strip()
        except (OSError, subprocess.SubprocessError, IndexError) as err:
            info["driver"] = f"unknown ({type(err).__name__})"
    return info


def cuda_tests(report: Report, record: dict) -> dict:
    """pytest -m 'cuda and not slow' over the test files that mark tests `cuda` (collecting only those
    files keeps it quick); on a machine without CUDA they all skip."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    if not files:
        raise RuntimeError("no test file marks tests with @pytest.mark.cuda")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda and not slow", *files]
    record["command"] = " ".join(command[1:])
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          timeout=max(10.0, min(150.0, report.remaining() - 5)))
    tail = (proc.stdout + proc.stderr)[-4000:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
    return {"returncode": proc.returncode, "files": files, "counts": counts, "output_tail": tail[-1500:]}


def inference(report: Report, record: dict, args, device: torch.device, compile_: bool) -> None:
    """Fill record['rows'][mode][batch]: ms per image, peak memory, max|diff| from plain fp32."""
    shape: DetrShape = QUICK if args.quick else FULL
    batches = (1, 2) if args.quick else (1, 8)
    warmup, repeats = (1, 2) if args.quick else (3, 10)
    from models.fuse import optimize_for_inference

    plain = build_detr(shape, aux_loss=False).eval().to(device)
    fused = optimize_for_inference(copy.deepcopy(plain))
    references = {}
    with torch.inference_mode(), precision("fp32", device):
        for batch in batches:
            references[batch] = plain(random_images(shape, batch).to(device))
    rows = record.setdefault("rows", {})
    record["config"] = {"model": shape.__dict__, "batches": batches, "warmup": warmup, "repeats": repeats}

    def measure(model: torch.nn.Module, name: str, batch: int) -> dict:
        images = random_images(shape, batch).to(device)
        reset_memory(device)
        with torch.inference_mode(), precision(name, device):
            began = time.perf_counter()
            model(images)
            sync(device)
            first_s = time.perf_counter() - began
            times, out = timed(lambda: model(images), device, warmup, repeats)
        m = median(times)
        return {"ms_per_image": 1000 * m / batch, "median_s": m, "first_call_s": first_s, "times_s": times,
                "peak_memory_mb": peak_memory_mb(device), "max_abs_diff": max_abs_diff(out, references[batch])}

    if not compile_:
        for batch in batches:
            attempt(rows, f"plain fp32 eager | b{batch}", lambda: measure(plain, "fp32", batch))
        for name in PRECISIONS:
            for batch in batches:
                key = f"fused {name} eager | b{batch}"
                if cuda_only(name, device):
                    rows[key] = {"skipped": f"{name}: a CUDA mode"}
                    continue
                attempt(rows, key, lambda: measure(fused, name, batch))
        return

    backend = args.compile_backend
    # bf16 first: the likely fastest mode, for the batch-1 target; then the rest while budget lasts,
    # keeping `reserve` seconds for the training compile section after this one.
    order = [("bf16", 1), ("fp16", 1), ("bf16", batches[1]), ("tf32", 1), ("fp32", 1), ("fp16", batches[1]),
             ("tf32", batches[1]), ("fp32", batches[1])]
    if args.quick:
        order = [("fp32", 1)]  # the dry run checks the code path; one compile is enough
    compiled = {}
    estimate = 30.0 if args.quick else 75.0
    reserve = 0.0 if args.quick else 130.0
    for index, (name, batch) in enumerate(order):
        key = f"fused {name} compile | b{batch}"
        if cuda_only(name, device):
            rows[key] = {"skipped": f"{name}: a CUDA mode"}
            continue
        needs = estimate + (reserve if index > 0 else 0.0)
        if report.remaining() < needs:
            rows[key] = {"skipped": f"budget: {report.remaining():.0f} s left, needs ~{needs:.0f} s "
                                    f"(with {reserve:.0f} s kept for the training compile)"}
            continue
        if name not in compiled:
            torch._dynamo.reset()  # a fresh cache per precision: no recompile-limit surprises
            compiled[name] = torch.compile(copy.deepcopy(fused), backend=backend, dynamic=False)
        attempt(rows, key, lambda: measure(compiled[name], name, batch))
        if "first_call_s" in rows[key]:
            rows[key]["compile_s"] = rows[key]["first_call_s"] - rows[key]["median_s"]
            estimate = max(estimate, 1.2 * rows[key]["compile_s"])
    if device.type == "cuda" and report.remaining() > estimate + reserve:
        key = "fused bf16 compile reduce-overhead (CUDA graphs) | b1"
        torch._dynamo.reset()
        graphs = torch.compile(copy.deepcopy(fused), mode="reduce-overhead", dynamic=False)
        attempt(rows, key, lambda: measure(graphs, "bf16", 1))
        if "first_call_s" in rows[key]:
            rows[key]["compile_s"] = rows[key]["first_call_s"] - rows[key]["median_s"]


def training(report: Report, record: dict, args, device: torch.device, compile_: bool) -> None:
    """Fill record['rows'][mode | b]: s per step, peak memory, first loss, as main.py runs each mode."""
    from engine import make_grad_scaler, train_one_epoch
    from models.fuse import optimize_for_training
    from util.nested_tensor import nested_tensor_from_tensor_list

    shape: DetrShape = QUICK if args.quick else FULL
    batches = (1, 2) if args.quick else (2, 4)
    repeats = 2 if args.quick else 3
    rows = record.setdefault("rows", {})
    record["config"] = {"model": shape.__dict__, "batches": batches, "steps_timed": repeats,
                        "clip_max_norm": 0.1, "optimizer": "AdamW lr 1e-4, backbone 1e-5, wd 1e-4"}
    criterion = build_criterion(shape).to(device)

    def step_mode(batch: int, fast: bool, amp: str, compiled: bool) -> dict:
        from detr_setup import build_optimizer

        model = build_detr(shape, aux_loss=True).to(device)
        if fast:
            # sparse dropout is torch's dropout on CUDA anyway; off, the CPU dry run keeps the plain
            # model's draws, so the first losses compare
            optimize_for_training(model, sparse_dropout=False)
        trained = torch.compile(model, backend=args.compile_backend) if compiled else model
        optimizer = build_optimizer(model)
        images = list(random_images(shape, batch))
        data = [(nested_tensor_from_tensor_list(images), random_targets(shape, batch))]
        reset_memory(device)

        def run(steps: int) -> dict:
            return train_one_epoch(trained, criterion, data * steps, optimizer, device, 0, 0.1, amp=amp,
                                   scaler=make_grad_scaler(amp, device), print_freq=0)

        torch.manual_seed(0)
        with precision("fp32", device):  # TF32 off: fp32 means fp32
            began = time.perf_counter()
            first = run(1)
            sync(device)
            first_s = time.perf_counter() - began
            began = time.perf_counter()
            run(repeats)
            sync(device)
            per_step = (time.perf_counter() - began) / repeats
        row = {"s_per_step": per_step, "first_step_s": first_s, "first_loss": first["loss"],
               "peak_memory_mb": peak_memory_mb(device)}
        if compiled:
            row["compile_s"] = first_s - per_step
        return row

    modes = [("fp32 as built", False, "off", False),
             ("fp32 main.py default (optimize_for_training)", True, "off", False), ("--amp bf16", False, "bf16", False)]
    if device.type == "cuda":
        modes.append(("--amp fp16", False, "fp16", False))
    runs = [(mode, batch) for mode in modes for batch in batches]
    if compile_:
        fp32 = ("--compile (fp32, optimize_for_training)", True, "off", True)
        bf16 = ("--compile --amp bf16", False, "bf16", True)
        # the smaller batch of both first; the dry run checks the code path with one compile
        runs = [(fp32, batches[0])] if args.quick else [(fp32, batches[0]), (bf16, batches[0]),
                                                         (fp32, batches[1]), (bf16, batches[1])]
    estimate = (30.0 if args.quick else 110.0) if compile_ else 5.0
    for (name, fast, amp, compiled), batch in runs:
        key = f"{name} | b{batch}"
        if report.remaining() < estimate:
            rows[key] = {"skipped": f"budget: {report.remaining():.0f} s left, needs ~{estimate:.0f} s"}
            continue
        if compiled:
            torch._dynamo.reset()
        attempt(rows, key, lambda: step_mode(batch, fast, amp, compiled))


def torchrun_nccl(report: Report, record: dict, args, device: torch.device) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(Path(__file__).resolve()), "--nccl-probe", "--device", str(device)]
    record["command"] = " ".join(command[1:])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=max(10.0, min(180.0, report.remaining() - 5)))
    output = proc.stdout + proc.stderr
    found = re.findall(r"^NCCL_PROBE (\{.*\})$", output, flags=re.M)
    result = json.loads(found[-1]) if found else {}
    if proc.returncode != 0 or not result.get("checkpoint_written"):
        raise RuntimeError(f"torchrun exited {proc.returncode}; probe result {result}; output:\n{output[-2500:]}")
    return {"returncode": proc.returncode, **result}


def nccl_probe(device_name: str) -> None:
    """Run under torchrun (1 process): a process group (NCCL on CUDA, gloo on CPU), one DDP step, then
    main.py's shapes epoch with the group alive. Prints 'NCCL_PROBE {json}'."""
    import torch.distributed as dist

    import main
    from engine import train_one_epoch
    from detr_setup import build_optimizer
    from util.nested_tensor import nested_tensor_from_tensor_list

    device = torch.device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    result: dict[str, Any] = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
    value = torch.ones(1, device=device)
    dist.all_reduce(value)
    result["all_reduce_ok"] = value.item() == dist.get_world_size()

    model = build_detr(QUICK, aux_loss=True).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    data = [(nested_tensor_from_tensor_list(list(random_images(QUICK, 2))), random_targets(QUICK, 2))]
    stats = train_one_epoch(ddp, build_criterion(QUICK).to(device), data, build_optimizer(model), device, 0, 0.1,
                            print_freq=0)
    result["ddp_step_loss"] = stats["loss"]

    with tempfile.TemporaryDirectory() as tmp:
        args = argparse.ArgumentParser(parents=[main.get_args_parser()]).parse_args(
            [*TINY_MAIN_FLAGS, "--device", str(device), "--data_path", str(Path(tmp) / "shapes"),
             "--output_dir", str(Path(tmp) / "run")])
        began = time.perf_counter()
        stats = main.main(args)  # its cleanup() destroys the process group at the end
        result["main_epoch_s"] = round(time.perf_counter() - began, 2)
        result["main_eval_ap"] = stats.get("coco_eval_bbox", [None])[0]
        result["checkpoint_written"] = (Path(tmp) / "run" / "checkpoint.pth").is_file()
    if dist.is_initialized():
        dist.destroy_process_group()
    print("NCCL_PROBE " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if 0 < abs(value) < 10 ** -digits else f"{value:.{digits}f}"
    return str(value)


def _table(rows: dict, columns: list[tuple[str, str, int]]) -> list[str]:
    lines = ["| mode | batch | " + " | ".join(title for title, _, _ in columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for key, row in rows.items():
        mode, _, batch = key.partition(" | ")
        if "error" in row or "skipped" in row:
            why = row.get("skipped") or "error: " + row["error"].strip().splitlines()[-1][:120]
            lines.append(f"| {mode} | {batch} | {why} |" + " |" * (len(columns) - 1))
            continue
        lines.append(f"| {mode} | {batch} | " + " | ".join(_fmt(row.get(field), d) for _, field, d in columns) + " |")
    return lines


def markdown(data: dict) -> str:
    meta, sections = data["meta"], data["sections"]
    env = sections.get("environment", {})
    lines = [f"# GPU report ({meta.get('started', '')})", "",
             f"Device: {env.get('gpu', env.get('device', '?'))}, driver {env.get('driver', '-')}, "
             f"torch {env.get('torch', '-')}, CUDA {env.get('cuda_runtime', '-')}, cuDNN {env.get('cudnn', '-')}; "
             f"quick={meta.get('quick')}, budget {meta.get('budget_s')} s, elapsed {meta.get('elapsed_s')} s.", "",
             "| section | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, rec in sections.items():
        note = rec.get("reason") or (rec.get("error", "").strip().splitlines() or [""])[-1][:150]
        if name == "cuda_tests" and "counts" in rec:
            note = ", ".join(f"{v} {k}" for k, v in rec["counts"].items())
        if name == "torchrun_nccl" and rec.get("backend"):
            note = f"backend {rec['backend']}, DDP step loss {_fmt(rec.get('ddp_step_loss'), 3)}, main.py epoch " \
                   f"{_fmt(rec.get('main_epoch_s'))} s"
        lines.append(f"| {name} | {rec.get('status')} | {_fmt(rec.get('seconds'), 1)} | {note} |")
    inference_rows = {**sections.get("inference_eager", {}).get("rows", {}),
                      **sections.get("inference_compile", {}).get("rows", {})}
    if inference_rows:
        lines += ["", "## Inference, detr_resnet50 (random weights), 800x1066 (quick: tiny model)", ""]
        lines += _table(inference_rows, [("ms/img", "ms_per_image", 2), ("peak MiB", "peak_memory_mb", 0),
                                         ("compile s", "compile_s", 1),
                                         ("max abs diff vs plain fp32", "max_abs_diff", 2)])
        fastest = min((r["ms_per_image"] for k, r in inference_rows.items()
                       if k.endswith("| b1") and "ms_per_image" in r), default=None)
        if fastest is not None:
            lines += ["", f"Fastest batch-1 mode: {fastest:.2f} ms/img (target <= {TARGET_MS_PER_IMAGE_B1:.0f} ms "
                          "on an H100-class card)."]
    training_rows = {**sections.get("training_eager", {}).get("rows", {}),
                     **sections.get("training_compile", {}).get("rows", {})}
    if training_rows:
        lines += ["", "## Training step (forward, loss, backward, clip, AdamW)", ""]
        lines += _table(training_rows, [("s/step", "s_per_step", 4), ("peak MiB", "peak_memory_mb", 0),
                                        ("compile s", "compile_s", 1), ("first loss", "first_loss", 4)])
        for batch in sorted({k.partition(" | ")[2] for k in training_rows}):
            base = training_rows.get(f"fp32 as built | {batch}", {}).get("s_per_step")
            best = min((r["s_per_step"] for k, r in training_rows.items() if k.endswith(f"| {batch}")
                        and "s_per_step" in r), default=None)
            if base and best:
                lines.append(f"\n{batch}: fastest step {base / best:.2f}x fp32 as built "
                             f"(target >= {TARGET_TRAIN_SPEEDUP}x).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny model and images: checks the script, not speed")
    parser.add_argument("--budget-s", type=float, default=330.0, help="time budget of the whole run (default 330)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where the JSON and .md go")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; 'eager' in a CPU --quick dry run, whose "
                             "inductor compile would take minutes)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    parser.add_argument("--nccl-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nccl_probe:
        nccl_probe(args.device)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; --device cpu --quick is the dry run")
    if args.compile_backend is None:
        args.compile_backend = "eager" if (args.quick and device.type == "cpu") else "inductor"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    meta = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": args.quick, "budget_s": args.budget_s, "compile_backend": args.compile_backend,
            "command": " ".join(sys.argv)}
    report = Report(Path(args.out_dir), args.budget_s, meta)
    quick = args.quick

    plan: list[tuple[str, Callable[[dict], Any], float]] = [
        ("environment", lambda rec: environment(device), 0),
        ("cuda_tests", lambda rec: cuda_tests(report, rec), 15),
        ("inference_eager", lambda rec: inference(report, rec, args, device, compile_=False), 5 if quick else 40),
        ("training_eager", lambda rec: training(report, rec, args, device, compile_=False), 5 if quick else 40),
        ("torchrun_nccl", lambda rec: torchrun_nccl(report, rec, args, device), 15 if quick else 30),
        ("inference_compile", lambda rec: inference(report, rec, args, device, compile_=True), 10 if quick else 75),
        ("training_compile", lambda rec: training(report, rec, args, device, compile_=True), 10 if quick else 100),
    ]
    for name, fn, needs_s in plan:
        if name in skip:
            report.data["sections"][name] = {"status": "skipped", "reason": "--skip"}
            continue
        report.section(name, fn, needs_s)
    report.write()
    print(f"wrote {report.out_dir / 'gpu_report.json'} and {report.out_dir / 'gpu_report.md'}", flush=True)
    print(markdown(report.data))


if __name__ == "__main__":
    main()
