"""benchmarks/gpu_report.py cannot rot before a GPU session runs it: its CPU dry run (--device cpu --quick)
goes through every section and writes the JSON and markdown, and its guard turns errors, overruns and a
spent budget into records instead of an aborted run."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["environment", "cuda_tests", "inference", "training", "torchrun_nccl", "compile"]


@pytest.fixture(scope="module")
def gpu_report():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_report


def dry_run_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_cpu_dry_run_fills_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_report.py", "--device", "cpu", "--quick",
                           "--out-dir", str(tmp_path)], cwd=ROOT, env=dry_run_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads((tmp_path / "gpu_report.json").read_text())["sections"]
    assert list(sections) == SECTIONS
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(SECTIONS, "ok"), \
        {name: s.get("error") for name, s in sections.items()}

    counts = sections["cuda_tests"]["counts"]  # without CUDA every marked test skips, none fails
    assert counts.get("skipped", 0) >= 1 and "failed" not in counts and "error" not in counts

    inference = sections["inference"]["rows"]
    for key in ("plain fp32 | b1", "fast fp32 | b1", "fast fp32 | b2", "fast bf16 | b1"):
        assert inference[key]["ms_per_item"] > 0 and inference[key]["first_call_s"] > 0, key
    assert inference["plain fp32 | b1"]["max_abs_diff"] == 0 and inference["plain fp32 | b1"]["speedup"] == 1.0
    assert inference["fast fp32 | b2"]["max_abs_diff"] < 1e-4
    assert 0 < inference["fast bf16 | b1"]["max_abs_diff"] < 0.5  # really ran in bf16
    assert "CUDA" in inference["fast tf32 | b1"]["skipped"]

    training = sections["training"]["rows"]
    plain, fast, bf16 = (training[f"{mode} | b2"] for mode in ("plain fp32", "fast fp32", "fast bf16"))
    assert plain["median_s"] > 0 and abs(plain["first_loss"] - fast["first_loss"]) < 1e-5 * plain["first_loss"]
    assert bf16["first_loss"] != plain["first_loss"]

    compiled = sections["compile"]["rows"]
    assert compiled["fast bf16 compile | b1"]["compile_s"] > 0
    assert compiled["fast fp32 train compile | b2"]["median_s"] > 0

    probe = sections["torchrun_nccl"]  # on CPU the probe's process group is gloo: the same code path
    assert probe["backend"] == "gloo" and probe["all_reduce_ok"] and probe["ddp_step_loss"] > 0

    table = (tmp_path / "gpu_report.md").read_text()
    assert "| fast fp32 | b1 |" in table and "| torchrun_nccl | ok |" in table and "| fast tf32 | b1 | tf32" in table


def test_guard_records_errors_overruns_and_spent_budget(tmp_path, gpu_report):
    report = gpu_report.Report(tmp_path, budget_s=1.5, meta={"quick": True})

    def partly_broken(record):
        rows = record.setdefault("rows", {})
        gpu_report.attempt(rows, "good | b1", lambda: {"ms_per_item": 1.0})
        gpu_report.attempt(rows, "bad | b1", lambda: 1 / 0)

    report.section("rows", partly_broken, needs_s=0)
    report.section("broken", lambda record: {}["missing"], needs_s=0)
    began = time.monotonic()
    report.section("overrun", lambda record: time.sleep(30), needs_s=0)
    assert time.monotonic() - began < 5  # stopped at the budget, not after 30 s
    report.section("late", lambda record: {}, needs_s=60)

    saved = json.loads((tmp_path / "gpu_report.json").read_text())["sections"]
    assert saved["rows"]["status"] == "ok" and saved["rows"]["rows"]["good | b1"] == {"ms_per_item": 1.0}
    assert "ZeroDivisionError" in saved["rows"]["rows"]["bad | b1"]["error"]
    assert saved["broken"]["status"] == "error" and "KeyError" in saved["broken"]["error"]
    assert saved["overrun"]["status"] == "timeout"
    assert saved["late"]["status"] == "skipped" and "budget" in saved["late"]["reason"]
    table = (tmp_path / "gpu_report.md").read_text()
    assert "| broken | error |" in table and "| late | skipped |" in table and "| good | b1 | 1.00 |" in table


@pytest.mark.slow
def test_gpu_session_dry_run_writes_every_file(tmp_path):
    """The one-call GPU session script, on the CPU with the tiny model, against a stand-in clone."""
    import shutil

    clone = tmp_path / "detr"
    for package in ("models", "util"):
        shutil.copytree(ROOT / package, clone / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(out), str(clone)], cwd=ROOT,
                          env={**dry_run_env(), "DRY_RUN": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["vs_original_b1.json", "vs_original_b8.json", "vs_original_train_b2.json", "vs_original.log",
         "gpu_report.json", "gpu_report.md", "gpu_report.log"])
