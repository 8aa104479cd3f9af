"""The benchmark scripts work: each runs in its --quick configuration, prints its table and writes the
figures it promises, and its fast modes give the plain path's numbers (fp32 within 1e-4, COCO stats equal).

The scripts run as `python benchmarks/bench_x.py --quick --out FILE` would (runpy with run_name='__main__',
in this process to save an interpreter's start-up).
"""
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLONE = ROOT / ".orig" / "detr_clone"


@pytest.fixture
def benchmarks_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


@pytest.fixture
def run_bench(monkeypatch, capsys, benchmarks_path):
    def run(script: str, out: Path, *extra: str) -> tuple[dict, str]:
        monkeypatch.setattr(sys, "argv", [script, "--quick", "--out", str(out), *extra])
        threads = torch.get_num_threads()
        try:
            runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
        finally:
            torch.set_num_threads(threads)  # bench_data runs one thread; give the others theirs back
        data = json.loads(out.read_text())
        assert data["machine"]["torch"] == torch.__version__ and data["machine"]["device"] == "cpu"
        assert data["quick"] is True
        return data, capsys.readouterr().out

    return run


def table_row(printed: str, mode: str) -> list[str]:
    """The cells of `mode`'s line in a printed table."""
    lines = [line.split() for line in printed.splitlines() if line.split()[:1] == [mode]]
    assert len(lines) >= 1, f"no row {mode!r} in:\n{printed}"
    return lines[0][1:]


def test_modes_run_in_turn_round_by_round_and_warmup_is_not_timed(benchmarks_path):
    import common

    calls = []
    times = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, 3)
    assert calls == ["a", "b"] * 4
    assert [len(t) for t in times.values()] == [3, 3]
    rows = common.summarize({"slow": [2.0, 4.0, 3.0], "quick": [1.0, 1.5, 0.5]}, "slow")
    assert rows["slow"]["speedup"] == 1.0 and rows["quick"]["median_s"] == 1.0 and rows["quick"]["speedup"] == 3.0


def test_inference_fast_modes_match_plain_path(tmp_path, run_bench):
    data, printed = run_bench("bench_inference.py", tmp_path / "inf.json", "--warmup", "0", "--repeats", "1",
                              "--bf16", "--batch-sizes", "1,2")
    assert set(data["results"]) == {"batch_1", "batch_2"}
    for rows in data["results"].values():
        assert set(rows) == {"plain", "fast", "onnxruntime", "bf16"}
        assert rows["plain"]["max_abs_diff"] == 0.0 and rows["plain"]["gflop_per_s"] > 0
        assert rows["onnxruntime"]["export_s"] > 0
        for name in ("fast", "onnxruntime"):
            assert rows[name]["median_s"] > 0 and rows[name]["max_abs_diff"] <= 1e-4, name
        assert 0 < rows["bf16"]["max_abs_diff"] < 0.5  # really ran in bf16
    assert table_row(printed, "fast")[4] == f"{data['results']['batch_1']['fast']['speedup']:.2f}"


def test_train_step_modes_match_and_report_memory(tmp_path, run_bench):
    data, printed = run_bench("bench_train_step.py", tmp_path / "train.json", "--warmup", "0", "--repeats", "1")
    rows = data["results"]
    assert set(rows) == {"plain", "channels_last", "fast", "fast_torch_dropout"}
    reference = rows["plain"]["first_loss"]
    assert reference > 0
    for name in ("channels_last", "fast_torch_dropout"):  # the same dropout draws
        assert rows[name]["first_loss_abs_diff"] <= 1e-4 * abs(reference), name
    assert rows["fast"]["first_loss_abs_diff"] > 1e-6  # its dropout draws other positions
    for row in rows.values():
        assert row["median_s"] > 0 and row["peak_rss_mb"] >= row["rss_before_step_mb"] > 0
    assert table_row(printed, "fast_torch_dropout")[2] == f"{rows['fast_torch_dropout']['first_loss']:.6f}"


def test_data_pipeline_both_paths_measured(tmp_path, run_bench):
    data, printed = run_bench("bench_data.py", tmp_path / "data.json")
    for recipe in ("train", "val"):
        rows = data["results"][recipe]
        assert rows["project"]["speedup"] == pytest.approx(rows["pil"]["median_s"] / rows["project"]["median_s"])
        for row in rows.values():
            assert row["img_per_s"] > 0 and row["decode_ms_per_img"] > 0 and row["transforms_ms_per_img"] > 0
    assert "train recipe" in printed and "val recipe" in printed and len(table_row(printed, "pil")) == 5


def test_coco_eval_backends_give_the_same_12_numbers(tmp_path, run_bench):
    data, printed = run_bench("bench_coco_eval.py", tmp_path / "eval.json")
    rows = data["results"]
    assert set(rows) == {"pycocotools", "faster"}
    reference = rows["pycocotools"]["stats"]
    assert len(reference) == 12 and 0 < reference[0] < 1
    assert rows["faster"]["stats"] == pytest.approx(reference, abs=1e-12) and rows["faster"]["same_numbers"]
    assert table_row(printed, "pycocotools")[:2] == [f"{rows['pycocotools']['median_s']:.3f}", "1.00"]


def test_pil_baseline_recipe_geometry(benchmarks_path):
    from PIL import Image

    import pil_reference

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


def stand_in_clone(tmp_path: Path) -> Path:
    """A folder laid out like a DETR clone, holding this project's own models/ and util/ (the original's
    constructors and state_dict layout): the original cannot be downloaded here."""
    clone = tmp_path / "detr"
    for package in ("models", "util"):
        shutil.copytree(ROOT / package, clone / package, ignore=shutil.ignore_patterns("__pycache__"))
    return clone


def test_side_by_side_inference_keeps_the_packages_apart(tmp_path, run_bench):
    import models.detr

    clone = stand_in_clone(tmp_path)
    ours_before = sys.modules["models.detr"]
    data, printed = run_bench("bench_vs_original.py", tmp_path / "vs.json", "--original", str(clone),
                              "--warmup", "0", "--repeats", "1", "--amp", "bf16")
    assert sys.modules["models.detr"] is ours_before is models.detr  # the project's packages are back in place
    assert data["config"]["original_detr_py"] == str(clone.resolve() / "models" / "detr.py")
    rows = data["results"]
    assert set(rows) == {"original", "plain", "fast", "onnxruntime", "original_bf16", "fast_bf16"}
    assert rows["original"]["max_abs_diff"] == 0.0 and rows["original"]["speedup"] == 1.0
    assert rows["original_bf16"]["speedup_same_precision"] == 1.0
    for name, row in rows.items():
        # the bf16 rows are compared with the original under the same autocast: bf16 rounding, not 1e-4
        assert row["median_s"] > 0 and row["max_abs_diff"] <= (0.1 if name.endswith("bf16") else 1e-4), name
    assert rows["fast_bf16"]["max_abs_diff"] > 1e-4  # autocast really ran in both
    assert table_row(printed, "plain")[3] == f"{rows['plain']['max_abs_diff']:.1e}"


def test_side_by_side_training_with_the_allocator_setting(tmp_path, run_bench, malloc_tuning_calls):
    data, _ = run_bench("bench_vs_original.py", tmp_path / "vs_train.json", "--original", str(stand_in_clone(tmp_path)),
                        "--train", "--warmup", "0", "--repeats", "1", "--retain_freed_memory", "--amp", "bf16")
    assert malloc_tuning_calls == [True] and data["config"]["retain_freed_memory"] is True
    rows = data["results"]
    assert set(rows) == {"original", "plain", "fast", "original_bf16", "fast_bf16"}
    assert data["config"]["batch"] == 2 and data["config"]["dropout"] == 0.0
    for name, row in rows.items():
        bound = 2e-2 if name.endswith("bf16") else 1e-5  # bf16 rows: against the original under autocast
        assert row["median_s"] > 0 and row["first_loss_abs_diff"] <= bound * rows["original"]["first_loss"], name
    assert rows["original_bf16"]["first_loss"] != rows["original"]["first_loss"]  # autocast really ran


@pytest.mark.skipif(not (CLONE / "models" / "detr.py").is_file(), reason="no copy of the original at .orig/detr_clone")
def test_side_by_side_with_the_original_code(tmp_path, run_bench):
    data, _ = run_bench("bench_vs_original.py", tmp_path / "vs.json", "--warmup", "0", "--repeats", "1")
    assert data["config"]["original_detr_py"] == str(CLONE.resolve() / "models" / "detr.py")
    for name, row in data["results"].items():
        assert row["median_s"] > 0 and row["max_abs_diff"] <= 1e-4, name


def test_side_by_side_refuses_a_folder_that_is_not_a_clone(tmp_path, run_bench):
    with pytest.raises(SystemExit, match="not a DETR clone"):
        run_bench("bench_vs_original.py", tmp_path / "vs.json", "--original", str(tmp_path))
    with pytest.raises(SystemExit, match="needs a GradScaler"):
        run_bench("bench_vs_original.py", tmp_path / "vs.json", "--original", str(tmp_path), "--train", "--amp", "fp16")
