"""COCO box evaluation of fixed detections through datasets/coco_eval.py's CocoEvaluator: its two backends.

Synthetic ground truth (500 images of 640x480, 1-15 boxes each across COCO's small/medium/large ranges)
and detections (jittered copies of most boxes plus false positives) come from a seed. Both backends
(pycocotools; faster = faster-coco-eval's COCOeval_faster) run update + accumulate + summarize on the
same data, interleaved; their 12 COCO numbers must agree to 1e-12 (summation order may move the last bit).

    python benchmarks/bench_coco_eval.py
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Callable

import numpy as np
import torch

from common import base_parser, print_table, setup, summarize, time_interleaved, write_json

SAME_NUMBERS_TOLERANCE = 1e-12
CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def synthetic_coco(num_images: int, seed: int = 0) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """(ground truth in COCO json layout, predictions per image id as CocoEvaluator.update takes them:
    scores [N], labels [N], boxes [N,4] absolute xyxy)."""
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    images, annotations, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:06d}.jpg"})
        boxes, scores, labels = [], [], []
        for _ in range(int(rng.integers(1, 16))):
            side = float(np.exp(rng.uniform(np.log(8), np.log(400))))
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, width - min(w, width - 1)), rng.uniform(0, height - min(h, height - 1))
            w, h = min(w, width - x), min(h, height - y)
            category = int(rng.choice(CATEGORY_IDS))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if rng.random() < 0.85:
                jx, jy, jw, jh = rng.normal(0, 0.08, 4) * [w, h, w, h]
                boxes.append([x + jx, y + jy, x + jx + max(w + jw, 1.0), y + jy + max(h + jh, 1.0)])
                scores.append(float(rng.uniform(0.3, 1.0)))
                labels.append(category if rng.random() < 0.9 else int(rng.choice(CATEGORY_IDS)))
        for _ in range(int(rng.integers(0, 30))):
            w, h = rng.uniform(5, 200, 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            boxes.append([x, y, x + w, y + h])
            scores.append(float(rng.uniform(0.0, 0.6)))
            labels.append(int(rng.choice(CATEGORY_IDS)))
        predictions[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                                 "scores": torch.tensor(scores, dtype=torch.float64),
                                 "labels": torch.tensor(labels, dtype=torch.int64)}
    categories = [{"id": c, "name": str(c), "supercategory": "x"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, predictions


def make_evaluation(gt: dict, predictions: dict, backend: str) -> Callable[[], np.ndarray]:
    """A callable evaluating `predictions` with CocoEvaluator(backend=...); `run.stats` keeps the 12 numbers."""
    from pycocotools.coco import COCO

    from datasets.coco_eval import CocoEvaluator

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    stats: list[np.ndarray] = []

    def run() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = CocoEvaluator(coco_gt, ["bbox"], backend=backend)
            evaluator.update(predictions)
            evaluator.synchronize_between_processes()
            evaluator.accumulate()
            evaluator.summarize()
        stats[:] = [np.asarray(evaluator.coco_eval["bbox"].stats[:12])]

    run.stats = stats
    return run


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="synthetic images (default 500; --quick 20)")
    args = parser.parse_args()
    _, warmup, repeats, info = setup(args, 0 if args.quick else 1, 1 if args.quick else 3)
    num_images = args.images or (20 if args.quick else 500)
    gt, predictions = synthetic_coco(num_images)
    detections = sum(len(p["scores"]) for p in predictions.values())
    print(f"{num_images} images, {len(gt['annotations'])} boxes, {detections} detections (evaluated on the CPU)",
          flush=True)

    modes = {backend: make_evaluation(gt, predictions, backend) for backend in ("pycocotools", "faster")}
    rows: dict[str, dict[str, Any]] = summarize(time_interleaved(modes, warmup, repeats), "pycocotools")
    reference = modes["pycocotools"].stats[0]
    for name, row in rows.items():
        stats = modes[name].stats[0]
        row.update(stats=stats.tolist(), max_abs_diff=float(np.abs(stats - reference).max()),
                   identical=bool(np.array_equal(stats, reference)))
        row["same_numbers"] = row["max_abs_diff"] <= SAME_NUMBERS_TOLERANCE
    print_table(f"COCO box evaluation, median of {repeats} (warm-up {warmup})", rows,
                [("median s", "median_s", ".3f"), ("vs pycocotools", "speedup", ".2f"),
                 ("max|diff|", "max_abs_diff", ".1e"), ("bitwise", "identical", "")])
    print("12 numbers (pycocotools): " + " ".join(f"{v:.4f}" for v in reference), flush=True)
    write_json("coco_eval", args, info, {"images": num_images, "boxes": len(gt["annotations"]),
                                         "detections": detections, "warmup": warmup, "repeats": repeats}, rows)


if __name__ == "__main__":
    main()
