"""Each benchmark script runs in its --quick configuration and writes the figures it promises.

The scripts run as `python benchmarks/bench_x.py --quick --out FILE` would (runpy with
run_name='__main__', in this process to save the start-up of a new interpreter); the JSON
is checked for its machine block, positive times, and for the fast modes giving the plain path's
numbers (fp32 within 1e-4, COCO stats equal).
"""
import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_bench(monkeypatch):
    def run(script: str, out: Path, *extra: str) -> dict:
        monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
        monkeypatch.setattr(sys, "argv", [script, "--quick", "--out", str(out), *extra])
        threads = torch.get_num_threads()
        try:
            runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
        finally:
            torch.set_num_threads(threads)  # bench_data runs one thread; give the others theirs back
        return check_common_fields(json.loads(out.read_text()))

    return run


def check_common_fields(data: dict) -> dict:
    machine = data["machine"]
    assert machine["cores"] >= 1 and machine["torch"] == torch.__version__ and machine["device"] == "cpu"
    assert data["quick"] is True
    return data


def test_inference_fast_modes_match_plain_path(tmp_path, run_bench):
    data = run_bench("bench_inference.py", tmp_path / "inf.json", "--warmup", "0", "--repeats", "1", "--bf16",
                     "--batch-sizes", "1,2")
    assert set(data["results"]) == {"batch_1", "batch_2"}
    for rows in data["results"].values():
        assert {"eager_fp32", "original_style", "inference_mode", "fold_bn_cl", "onnxruntime",
                "bf16_autocast"} <= set(rows)
        assert rows["onnxruntime"]["export_s"] > 0 and rows["eager_fp32"]["gflop_per_s"] > 0
        assert rows["eager_fp32"]["max_abs_diff"] == 0.0
        for name, row in rows.items():
            assert row["median_s"] > 0 and row["img_per_s"] > 0
            if row["fp32"]:
                assert row["max_abs_diff"] <= 1e-4, (name, row["max_abs_diff"])
        # bf16 really ran in another precision: its outputs are not bit-identical to fp32.
        assert 0 < rows["bf16_autocast"]["max_abs_diff"] < 0.5


def test_train_step_modes_match_and_report_memory(tmp_path, run_bench):
    data = run_bench("bench_train_step.py", tmp_path / "train.json", "--warmup", "0", "--repeats", "1")
    rows = data["results"]
    assert set(rows) == {"eager_fp32", "channels_last", "fast_train", "fast_train_torch_dropout"}
    reference = rows["eager_fp32"]["first_loss"]
    assert reference > 0
    for name in ("channels_last", "fast_train_torch_dropout"):  # the same dropout draws
        assert rows[name]["first_loss_abs_diff"] <= 1e-4 * max(1.0, abs(reference)), name
    assert rows["fast_train"]["first_loss_abs_diff"] > 1e-6  # sparse dropout: other draws
    for row in rows.values():
        assert row["median_s"] > 0
        assert row["peak_rss_mb"] >= row["rss_before_step_mb"] > 0


def test_peak_measures_matmul_and_conv(tmp_path, run_bench):
    data = run_bench("bench_peak.py", tmp_path / "peak.json", "--repeats", "1", "--warmup", "0")
    assert set(data["results"]) == {"matmul", "conv3x3"}
    for row in data["results"].values():
        assert row["gflop_per_s"] == pytest.approx(row["gflop"] / row["median_s"]) and row["gflop_per_s"] > 0


def test_data_pipeline_both_paths_measured(tmp_path, run_bench):
    data = run_bench("bench_data.py", tmp_path / "data.json")
    for recipe in ("train", "val"):
        rows = data["results"][recipe]
        assert rows["project"]["img_per_s"] > 0 and rows["pil"]["img_per_s"] > 0
        assert rows["project_over_pil"] == pytest.approx(rows["project"]["img_per_s"] / rows["pil"]["img_per_s"])


def test_coco_eval_backends_give_the_same_12_numbers(tmp_path, run_bench):
    data = run_bench("bench_coco_eval.py", tmp_path / "eval.json")
    rows = data["results"]
    reference = rows["pycocotools"]["stats"]
    assert len(reference) == 12 and 0 < reference[0] < 1
    for name, row in rows.items():
        assert row["median_s"] > 0
        assert row["stats"] == pytest.approx(reference, abs=1e-12), name


def test_hf_peer_skips_cleanly_without_transformers(tmp_path, run_bench):
    if importlib.util.find_spec("transformers") is not None:
        pytest.skip("transformers is installed: the peer comparison really runs (not a smoke test)")
    data = run_bench("bench_hf_detr.py", tmp_path / "hf.json")
    assert "transformers is not installed" in data["skipped"]


def test_pil_baseline_recipe_geometry():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pil_reference
    from PIL import Image

    # Short side to 800 with the long side capped at 1333: 640x480 -> 1066x800; 480x2000 -> short 320, long 1333.
    boxes = torch.tensor([[0.0, 0.0, 64.0, 48.0]])
    assert pil_reference.resize(Image.new("RGB", (640, 480)), boxes, 800, 1333)[0].size == (1066, 800)
    assert pil_reference.resize(Image.new("RGB", (480, 2000)), boxes, 800, 1333)[0].size == (320, 1333)
    img = Image.new("RGB", (100, 50))
    _, flipped = pil_reference.hflip(img, torch.tensor([[10.0, 5.0, 30.0, 25.0]]))
    assert flipped.tolist() == [[70.0, 5.0, 90.0, 25.0]]
    tensor, target = pil_reference.val_transform(img, {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0]]),
                                                       "labels": torch.tensor([3])})
    assert tuple(tensor.shape) == (3, 666, 1332)
    assert torch.allclose(target["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4]]))
    images, mask, _ = pil_reference.collate([(torch.ones(3, 2, 3), {}), (torch.ones(3, 4, 1), {})])
    assert images.shape == (2, 3, 4, 3) and mask.sum().item() == 6 + 8


@pytest.mark.parametrize("train", [False, True])
def test_allocator_benchmark_runs_both_modes_in_their_own_processes(tmp_path, run_bench, train):
    data = run_bench("bench_allocator.py", tmp_path / "alloc.json", "--repeats", "1", *(["--train"] if train else []))
    assert data["config"]["train_batch"] == (2 if train else None)
    rows = data["results"]
    assert set(rows) == {"glibc_default", "retain_freed_memory"}
    assert rows["glibc_default"]["applied"] is False
    for row in rows.values():
        assert row["median_s"] > 0 and row["peak_rss_mb"] > 0
        assert len(row["times_s"]) == 1 and len(row["times_s"][0]) == data["config"]["forwards"]


def test_side_by_side_with_an_original_clone(tmp_path, run_bench, malloc_tuning_calls):
    """bench_vs_original.py imports the original's models/ and util/ from a clone, apart from this
    project's packages of the same names. The original cannot be downloaded here, so a copy of this
    project's own models/ and util/ (the original's constructors and state_dict layout) stands in."""
    import shutil

    clone = tmp_path / "detr"
    for package in ("models", "util"):
        shutil.copytree(ROOT / package, clone / package, ignore=shutil.ignore_patterns("__pycache__"))
    import models.detr

    ours_before = sys.modules["models.detr"]
    data = run_bench("bench_vs_original.py", tmp_path / "vs.json", "--original", str(clone), "--warmup", "0",
                     "--repeats", "1", "--amp", "bf16")
    assert sys.modules["models.detr"] is ours_before  # the project's packages are back in place
    assert data["config"]["original_detr_py"] == str(clone.resolve() / "models" / "detr.py")
    rows = data["results"]
    assert set(rows) == {"original", "plain", "fold_bn_cl", "onnxruntime", "original_bf16", "fold_bn_cl_bf16"}
    assert rows["original"]["max_abs_diff"] == 0.0 and rows["original"]["speedup_vs_original"] == 1.0
    assert rows["original_bf16"]["max_abs_diff"] == 0.0 and rows["original_bf16"]["speedup_vs_original_same_precision"] == 1.0
    for name, row in rows.items():
        # the bf16 rows are compared with the original under the same autocast: bf16 rounding, not 1e-4
        assert row["median_s"] > 0 and row["max_abs_diff"] <= (0.1 if name.endswith("bf16") else 1e-4)
    # autocast really ran in both: fp32 codes agree to ~1e-6, bf16 rounding leaves more than 1e-4
    assert rows["fold_bn_cl_bf16"]["max_abs_diff"] > 1e-4

    data = run_bench("bench_vs_original.py", tmp_path / "vs_train.json", "--original", str(clone), "--train",
                     "--warmup", "0", "--repeats", "1", "--retain_freed_memory", "--amp", "bf16")
    assert malloc_tuning_calls == [True] and data["config"]["retain_freed_memory"] is True
    rows = data["results"]
    assert set(rows) == {"original", "plain", "fast_train", "original_bf16", "fast_train_bf16"}
    assert data["config"]["batch"] == 2 and data["config"]["amp"] == "bf16"
    for name, row in rows.items():
        bound = 2e-2 if name.endswith("bf16") else 1e-5  # bf16 rows: against the original under autocast
        assert row["median_s"] > 0 and row["first_loss_abs_diff"] <= bound * rows["original"]["first_loss"]
    assert rows["original_bf16"]["first_loss"] != rows["original"]["first_loss"]  # autocast really ran


def test_side_by_side_refuses_a_folder_that_is_not_a_clone(tmp_path, run_bench):
    with pytest.raises(SystemExit, match="not a DETR clone"):
        run_bench("bench_vs_original.py", tmp_path / "vs.json", "--original", str(tmp_path))
    with pytest.raises(SystemExit, match="needs a GradScaler"):
        run_bench("bench_vs_original.py", tmp_path / "vs.json", "--original", str(tmp_path), "--train", "--amp", "fp16")
