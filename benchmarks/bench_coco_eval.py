"""COCO box evaluation time for a fixed set of detections: pycocotools versus faster-coco-eval.

Synthetic ground truth (500 images of 640x480, 1-15 boxes each of all COCO area ranges, 80
category ids) and detections (jittered copies of most ground-truth boxes plus false positives,
<= 100 per image) are generated from a seed. Each backend runs loadRes + evaluate + accumulate +
summarize on the same data; the 12 COCO numbers must be identical. Where datasets/coco_eval.py
offers CocoEvaluator(..., backend=...), the project's evaluator is timed the same way.

    python benchmarks/bench_coco_eval.py
"""
from __future__ import annotations

import contextlib
import copy
import io
import time

import numpy as np

from common import base_parser, machine_info, median, print_machine, setup, write_json

# Summation order may differ in the last bit of a double; anything larger is a real difference.
SAME_NUMBERS_TOLERANCE = 1e-12
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def synthetic_coco(num_images: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """(ground truth in COCO json layout, detections as loadRes takes them: bbox xywh absolute)."""
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:06d}.jpg"})
        for _ in range(int(rng.integers(1, 16))):
            side = float(np.exp(rng.uniform(np.log(8), np.log(400))))  # small, medium and large
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, width - min(w, width - 1)), rng.uniform(0, height - min(h, height - 1))
            w, h = min(w, width - x), min(h, height - y)
            category = int(rng.choice(CATEGORY_IDS))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if rng.random() < 0.85:
                jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
                label = category if rng.random() < 0.9 else int(rng.choice(CATEGORY_IDS))
                detections.append({"image_id": image_id, "category_id": label,
                                   "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0),
                                            max(h + jitter[3], 1.0)],
                                   "score": float(rng.uniform(0.3, 1.0))})
        for _ in range(int(rng.integers(0, 30))):
            w, h = rng.uniform(5, 200, 2)
            detections.append({"image_id": image_id, "category_id": int(rng.choice(CATEGORY_IDS)),
                               "bbox": [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h],
                               "score": float(rng.uniform(0.0, 0.6))})
    categories = [{"id": c, "name": str(c), "supercategory": "x"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def run_pycocotools(gt: dict, dets: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def run_faster(gt: dict, dets: list[dict]) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(copy.deepcopy(gt))
        evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats[:12])


def project_runner(backend: str):
    """The project's CocoEvaluator with a backend, fed per-image predictions (xyxy absolute); None if absent."""
    try:
        from datasets.coco_eval import CocoEvaluator
    except ImportError as err:
        print(f"project CocoEvaluator: skipped ({err})", flush=True)
        return None
    import torch
    from pycocotools.coco import COCO

    def run(gt: dict, dets: list[dict]) -> np.ndarray:
        predictions: dict[int, dict] = {}
        for image_id in sorted({d["image_id"] for d in dets}):
            predictions[image_id] = {"boxes": [], "scores": [], "labels": []}
        for d in dets:
            x, y, w, h = d["bbox"]
            p = predictions[d["image_id"]]
            p["boxes"].append([x, y, x + w, y + h])
            p["scores"].append(d["score"])
            p["labels"].append(d["category_id"])
        predictions = {k: {"boxes": torch.tensor(v["boxes"], dtype=torch.float64),
                           "scores": torch.tensor(v["scores"], dtype=torch.float64),
                           "labels": torch.tensor(v["labels"])} for k, v in predictions.items()}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = copy.deepcopy(gt)
            coco_gt.createIndex()
            evaluator = CocoEvaluator(coco_gt, ["bbox"], backend=backend)
            evaluator.update(predictions)
            evaluator.synchronize_between_processes()
            evaluator.accumulate()
            evaluator.summarize()
        return np.asarray(evaluator.coco_eval["bbox"].stats[:12])

    return run


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="synthetic images (default 500; quick 20)")
    args = parser.parse_args()
    device = setup(args)
    num_images = args.images or (20 if args.quick else 500)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)

    info = machine_info(device)
    print_machine(info)
    gt, dets = synthetic_coco(num_images)
    print(f"{num_images} images, {len(gt['annotations'])} boxes, {len(dets)} detections "
          f"(evaluation runs on the CPU)", flush=True)

    backends = {"pycocotools": run_pycocotools, "faster_coco_eval": run_faster}
    if project_runner("pycocotools") is not None:
        backends["project_pycocotools"] = project_runner("pycocotools")
        backends["project_faster"] = project_runner("faster")

    times: dict[str, list[float]] = {name: [] for name in backends}
    stats: dict[str, np.ndarray] = {}
    for round_index in range(warmup + repeats):
        for name, run in backends.items():
            start = time.perf_counter()
            stats[name] = run(gt, dets)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)

    base = median(times["pycocotools"])
    reference = stats["pycocotools"]
    rows = {}
    for name in backends:
        m = median(times[name])
        diff = float(np.abs(stats[name] - reference).max())
        rows[name] = {"median_s": m, "speedup_vs_pycocotools": base / m, "times_s": times[name],
                      "stats": stats[name].tolist(), "identical_to_pycocotools": bool(np.array_equal(stats[name], reference)),
                      "max_abs_diff": diff, "within_1e-12": diff <= SAME_NUMBERS_TOLERANCE}
        print(f"{name:20s} {m:8.3f} s  {base / m:6.2f}x  bitwise identical={rows[name]['identical_to_pycocotools']}"
              f"  max|diff|={diff:.1e}", flush=True)
    print("12 numbers (pycocotools): " + " ".join(f"{v:.4f}" for v in reference))

    write_json("coco_eval", {
        "benchmark": "coco_eval", "machine": info, "quick": args.quick,
        "config": {"images": num_images, "boxes": len(gt["annotations"]), "detections": len(dets),
                   "warmup": warmup, "repeats": repeats},
        "results": rows,
    }, args.out)


if __name__ == "__main__":
    main()
