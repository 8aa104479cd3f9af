"""Panoptic quality (PQ, SQ, RQ) for DETR's panoptic predictions.

`PanopticEvaluator` writes each predicted PNG into its output folder as it comes, gathers the
segments_info of every process, writes `predictions.json` there and scores it with `pq_compute`.
`pq_compute` follows panopticapi's definition (single process, numpy): a predicted and a
ground-truth segment of one category match when IoU > 0.5, where the union leaves out the
predicted pixels on VOID (id 0); crowd ground truth never matches and is not a false negative;
an unmatched prediction is a false positive unless more than half of it lies on VOID or on a crowd
region of its own category. Per category PQ = sum(IoU of matches) / (TP + FP/2 + FN/2), averaged
over the categories that occur (all, things, stuff).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import PIL.Image

from datasets.coco_panoptic import rgb_to_id

VOID = 0
# Pairs (gt id, predicted id) are packed into one integer for np.unique.
OFFSET = 256 * 256 * 256


def _gather(obj) -> list:
    try:
        from util.distributed import all_gather, get_world_size
    except ImportError:
        return [obj]
    return all_gather(obj) if get_world_size() > 1 else [obj]


def _is_main_process() -> bool:
    try:
        from util.distributed import is_main_process
    except ImportError:
        return True
    return is_main_process()


class PanopticEvaluator:
    """Collects predicted PNGs + segments_info and computes PQ against (ann_file, ann_folder).

    output_dir is the folder that receives the PNGs and predictions.json (the run's
    `<output_dir>/panoptic_eval`, as the original's engine passes it).
    """

    def __init__(self, ann_file: str | Path, ann_folder: str | Path, output_dir: str | Path = "panoptic_eval"):
        self.gt_json = Path(ann_file)
        self.gt_folder = Path(ann_folder)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.predictions: list[dict] = []

    def update(self, predictions: list[dict]) -> None:
        """predictions: dicts with `png_string` (PNG bytes of segment ids), `segments_info`,
        `image_id` and `file_name` (the PNG's name); the PNG is written at once."""
        for p in predictions:
            p = dict(p)
            with open(self.output_dir / p["file_name"], "wb") as f:
                f.write(p.pop("png_string"))
            self.predictions.append(p)

    def synchronize_between_processes(self) -> None:
        """Merge all processes' predictions, each image once (a padded sampler repeats some)."""
        merged, seen = [], set()
        for rank_predictions in _gather(self.predictions):
            for p in rank_predictions:
                if p["image_id"] not in seen:
                    seen.add(p["image_id"])
                    merged.append(p)
        self.predictions = merged

    def summarize(self) -> dict | None:
        """Write predictions.json and return pq_compute's result (main process; None elsewhere)."""
        if not _is_main_process():
            return None
        predictions_json = self.output_dir / "predictions.json"
        with open(predictions_json, "w") as f:
            json.dump({"annotations": self.predictions}, f, default=_json_number)
        result = pq_compute(self.gt_json, predictions_json, gt_folder=self.gt_folder, pred_folder=self.output_dir)
        print(format_pq_table(result))
        return result


def _json_number(value):
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to predictions.json")


def _read_ids(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    return rgb_to_id(np.asarray(PIL.Image.open(path).convert("RGB")))


class _CategoryStat:
    __slots__ = ("iou", "tp", "fp", "fn")

    def __init__(self):
        self.iou, self.tp, self.fp, self.fn = 0.0, 0, 0, 0


def _score_image(gt_ann: dict, pred_ann: dict, gt_ids: np.ndarray, pred_ids: np.ndarray,
                 categories: dict, stats: dict) -> None:
    """Add one image's TP/FP/FN and matched IoUs to `stats` (per category id)."""
    image_id = gt_ann["image_id"]
    gt_segments = {s["id"]: dict(s) for s in gt_ann["segments_info"]}
    pred_segments = {s["id"]: dict(s) for s in pred_ann["segments_info"]}
    # Predicted areas come from the PNG; every labelled pixel must belong to a listed segment.
    labels, counts = np.unique(pred_ids, return_counts=True)
    unseen = set(pred_segments)
    for label, count in zip(labels.tolist(), counts.tolist()):
        if label not in pred_segments:
            if label == VOID:
                continue
            raise KeyError(f"image {image_id}: segment {label} is in the predicted PNG but not in its segments_info")
        pred_segments[label]["area"] = count
        unseen.discard(label)
        if pred_segments[label]["category_id"] not in categories:
            raise KeyError(f"image {image_id}: segment {label} has unknown category id "
                           f"{pred_segments[label]['category_id']}")
    if unseen:
        raise KeyError(f"image {image_id}: segments {sorted(unseen)} are in segments_info but not in the PNG")

    pairs, intersections = np.unique(gt_ids.astype(np.uint64) * OFFSET + pred_ids.astype(np.uint64),
                                     return_counts=True)
    overlap = {(int(p // OFFSET), int(p % OFFSET)): int(n) for p, n in zip(pairs, intersections)}

    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in overlap.items():
        gt, pred = gt_segments.get(gt_label), pred_segments.get(pred_label)
        if gt is None or pred is None or gt.get("iscrowd", 0) == 1 or gt["category_id"] != pred["category_id"]:
            continue
        union = pred["area"] + gt["area"] - intersection - overlap.get((VOID, pred_label), 0)
        iou = intersection / union
        if iou > 0.5:
            stats[gt["category_id"]].tp += 1
            stats[gt["category_id"]].iou += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    crowd_by_category = {}
    for gt_label, gt in gt_segments.items():
        if gt_label in gt_matched:
            continue
        if gt.get("iscrowd", 0) == 1:
            crowd_by_category[gt["category_id"]] = gt_label
            continue
        stats[gt["category_id"]].fn += 1

    for pred_label, pred in pred_segments.items():
        if pred_label in pred_matched:
            continue
        ignored = overlap.get((VOID, pred_label), 0)
        if pred["category_id"] in crowd_by_category:
            ignored += overlap.get((crowd_by_category[pred["category_id"]], pred_label), 0)
        if ignored / pred["area"] > 0.5:
            continue
        stats[pred["category_id"]].fp += 1


def _average(stats: dict, categories: dict, isthing: bool | None) -> tuple[dict, dict]:
    """({pq, sq, rq, n} averaged over the categories that occur, {category id: pq/sq/rq})."""
    pq = sq = rq = 0.0
    n = 0
    per_class = {}
    for category_id, info in categories.items():
        if isthing is not None and bool(info.get("isthing", 1)) != isthing:
            continue
        s = stats[category_id]
        if s.tp + s.fp + s.fn == 0:
            per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
        class_pq = s.iou / denominator
        class_sq = s.iou / s.tp if s.tp else 0.0
        class_rq = s.tp / denominator
        per_class[category_id] = {"pq": class_pq, "sq": class_sq, "rq": class_rq}
        pq, sq, rq = pq + class_pq, sq + class_sq, rq + class_rq
    if n == 0:
        return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def pq_compute(gt_json_file: str | Path, pred_json_file: str | Path, gt_folder: str | Path | None = None,
               pred_folder: str | Path | None = None) -> dict:
    """PQ of the predictions against the ground truth, as panopticapi.evaluation.pq_compute.

    Folders default to the JSON paths without '.json'. Every ground-truth image needs a
    prediction. Returns {"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {...}},
    values as fractions (0..1).
    """
    gt_json_file, pred_json_file = Path(gt_json_file), Path(pred_json_file)
    gt_folder = Path(gt_folder) if gt_folder else gt_json_file.with_suffix("")
    pred_folder = Path(pred_folder) if pred_folder else pred_json_file.with_suffix("")
    gt_json = json.loads(gt_json_file.read_text())
    pred_json = json.loads(pred_json_file.read_text())
    categories = {c["id"]: c for c in gt_json["categories"]}
    predictions = {p["image_id"]: p for p in pred_json["annotations"]}
    stats: dict[int, _CategoryStat] = defaultdict(_CategoryStat)
    for gt_ann in gt_json["annotations"]:
        pred_ann = predictions.get(gt_ann["image_id"])
        if pred_ann is None:
            raise KeyError(f"no prediction for image {gt_ann['image_id']} of {gt_json_file} in {pred_json_file}")
        _score_image(gt_ann, pred_ann, _read_ids(gt_folder / gt_ann["file_name"]),
                     _read_ids(pred_folder / pred_ann["file_name"]), categories, stats)
    result = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        result[name], per_class = _average(stats, categories, isthing)
        if name == "All":
            result["per_class"] = per_class
    return result


def format_pq_table(result: dict) -> str:
    """The PQ/SQ/RQ table (percent) for All, Things, Stuff."""
    lines = [f"{'':10s}|{'PQ':>8s} {'SQ':>8s} {'RQ':>8s} {'N':>5s}", "-" * 43]
    for name in ("All", "Things", "Stuff"):
        r = result[name]
        lines.append(f"{name:10s}|{100 * r['pq']:8.1f} {100 * r['sq']:8.1f} {100 * r['rq']:8.1f} {r['n']:5d}")
    return "\n".join(lines)
