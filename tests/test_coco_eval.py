"""CocoEvaluator gives pycocotools' own 12 numbers; each image counts once across processes."""
import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import datasets.coco_eval as coco_eval_module
from datasets.coco_eval import CocoEvaluator


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _ground_truth(num_images=25, size=(48, 64), seed=0):
    """COCO gt of rectangles (3 categories, some crowd) and noisy detections with masks."""
    rng = np.random.default_rng(seed)
    h, w = size
    images, anns, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id}.jpg"})
        boxes, labels, scores, masks = [], [], [], []
        for _ in range(int(rng.integers(0, 5))):
            x0, y0 = rng.integers(0, w - 12), rng.integers(0, h - 12)
            bw, bh = rng.integers(4, w - x0), rng.integers(4, h - y0)
            mask = np.zeros((h, w), np.uint8)
            mask[y0:y0 + bh, x0:x0 + bw] = 1
            rle = coco_mask.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode()
            category = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "segmentation": rle,
                         "bbox": [float(x0), float(y0), float(bw), float(bh)], "area": float(bw * bh),
                         "iscrowd": int(rng.random() < 0.1)})
            if rng.random() < 0.8:
                dx, dy = rng.integers(-2, 3, 2)
                pred = np.zeros((h, w), np.uint8)
                pred[max(0, y0 + dy):y0 + dy + bh, max(0, x0 + dx):x0 + dx + bw] = 1
                boxes.append([x0 + dx, y0 + dy, x0 + dx + bw, y0 + dy + bh])
                labels.append(category if rng.random() < 0.85 else int(rng.integers(1, 4)))
                scores.append(float(rng.random()))
                masks.append(pred)
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x0, y0 = rng.integers(0, w - 10), rng.integers(0, h - 10)
            pred = np.zeros((h, w), np.uint8)
            pred[y0:y0 + 8, x0:x0 + 8] = 1
            boxes.append([x0, y0, x0 + 8, y0 + 8])
            labels.append(int(rng.integers(1, 4)))
            scores.append(float(rng.random() * 0.5))
            masks.append(pred)
        predictions[image_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores),
            "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), np.uint8))[:, None] > 0,
        }
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)]}
    _quiet(coco.createIndex)
    return coco, predictions


def _direct_stats(coco, predictions, iou_type):
    """pycocotools run by hand on the same detections."""
    results = []
    for image_id, p in predictions.items():
        for k in range(len(p["scores"])):
            result = {"image_id": image_id, "category_id": int(p["labels"][k]), "score": float(p["scores"][k])}
            if iou_type == "bbox":
                x0, y0, x1, y1 = p["boxes"][k].tolist()
                result["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            else:
                result["segmentation"] = coco_mask.encode(np.asfortranarray(p["masks"][k, 0].numpy().astype(np.uint8)))
            results.append(result)
    evaluator = COCOeval(coco, _quiet(coco.loadRes, results), iou_type)
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return np.asarray(evaluator.stats)


def _evaluate(coco, batches, iou_types=("bbox", "segm"), backend="pycocotools"):
    evaluator = CocoEvaluator(coco, list(iou_types), backend=backend)
    for batch in batches:
        evaluator.update(batch)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    _quiet(evaluator.summarize)
    return evaluator


def _batches(predictions, size=4):
    items = list(predictions.items())
    return [dict(items[i:i + size]) for i in range(0, len(items), size)]


def test_twelve_numbers_equal_pycocotools_run_directly():
    coco, predictions = _ground_truth()
    evaluator = _evaluate(coco, _batches(predictions))
    for iou_type in ("bbox", "segm"):
        expected = _direct_stats(coco, predictions, iou_type)
        stats = evaluator.coco_eval[iou_type].stats
        assert len(stats) == 12 and np.array_equal(stats, expected), iou_type
        assert 0.05 < stats[0] < 1.0  # a real, non-trivial AP
    assert evaluator.coco_eval["bbox"].eval["precision"].shape == (10, 101, 3, 4, 3)


def test_faster_backend_gives_the_same_numbers():
    coco, predictions = _ground_truth()
    reference = _evaluate(coco, _batches(predictions))
    faster = _evaluate(coco, _batches(predictions), backend="faster")
    for iou_type in ("bbox", "segm"):
        assert np.allclose(faster.coco_eval[iou_type].stats, reference.coco_eval[iou_type].stats, atol=1e-12, rtol=0)


def test_padded_sampler_duplicates_count_once(monkeypatch):
    """Two ranks, the second padded with repeats of the first rank's images (with other detections)."""
    coco, predictions = _ground_truth()
    ids = sorted(predictions)
    rank0 = {i: predictions[i] for i in ids[::2]}
    rank1 = {i: predictions[i] for i in ids[1::2]}
    junk = {"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.99]),
            "masks": torch.ones(1, 1, 48, 64, dtype=torch.bool)}
    padding = {ids[0]: junk, ids[2]: junk}
    evaluators = [CocoEvaluator(coco, ["bbox"]) for _ in range(2)]
    evaluators[0].update(rank0)
    evaluators[1].update(rank1)
    evaluators[1].update(padding)
    evaluators[1].update({ids[1]: junk})  # a repeat within one rank is ignored as well
    gathered = [copy.deepcopy((e.img_ids, e.results)) for e in evaluators]
    monkeypatch.setattr(coco_eval_module, "_gather", lambda obj: gathered)
    merged = evaluators[0]
    merged.synchronize_between_processes()
    assert sorted(merged.img_ids) == ids and len(merged.img_ids) == len(ids)
    merged.accumulate()
    _quiet(merged.summarize)
    single = _evaluate(coco, [predictions], iou_types=("bbox",))
    assert np.array_equal(merged.coco_eval["bbox"].stats, single.coco_eval["bbox"].stats)


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_no_detections_does_not_crash(backend):
    coco, predictions = _ground_truth(num_images=5)
    empty = {i: {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                 "masks": torch.zeros(0, 1, 48, 64, dtype=torch.bool)} for i in predictions}
    evaluator = _evaluate(coco, [empty], backend=backend)
    for iou_type in ("bbox", "segm"):
        stats = evaluator.coco_eval[iou_type].stats
        assert len(stats) == 12 and stats.max() <= 0
    nothing = _evaluate(coco, [], iou_types=("bbox",), backend=backend)
    assert nothing.coco_eval["bbox"].stats.max() <= 0


def test_bad_arguments_are_refused():
    coco, _ = _ground_truth(num_images=2)
    with pytest.raises(ValueError, match="iou type"):
        CocoEvaluator(coco, ["keypoints"])
    with pytest.raises(ValueError, match="backend"):
        CocoEvaluator(coco, ["bbox"], backend="fast")
    with pytest.raises(ValueError, match="image id 99"):
        CocoEvaluator(coco, ["bbox"]).update({99: {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0),
                                                   "scores": torch.zeros(0)}})
