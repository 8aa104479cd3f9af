"""COCO box and mask AP over a whole evaluation, merged across processes.

`update` takes the post-processed predictions per image; results are kept per image id, so an
image seen twice (a padded DistributedSampler repeats images to even out the ranks) counts
once. `synchronize_between_processes` gathers every rank's results; `accumulate` runs COCOeval
(pycocotools, or faster_coco_eval's COCOeval_faster with backend='faster', same 12 numbers) over
all of them at once; `summarize` prints the usual table; the 12 numbers are then in
`coco_eval[iou_type].stats` and the precision/recall arrays in `coco_eval[iou_type].eval`.
"""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster")


def _gather(obj) -> list:
    """all_gather across processes when util.distributed is there and initialised, else [obj]."""
    try:
        from util.distributed import all_gather, get_world_size
    except ImportError:
        return [obj]
    return all_gather(obj) if get_world_size() > 1 else [obj]


def _as_int(image_id) -> int:
    return int(image_id.item() if isinstance(image_id, torch.Tensor) else image_id)


class CocoEvaluator:
    """Accumulates detections for `coco_gt` (pycocotools COCO) and scores them per iou type."""

    def __init__(self, coco_gt: COCO, iou_types: list[str] | tuple[str, ...], backend: str = "pycocotools"):
        for iou_type in iou_types:
            if iou_type not in IOU_TYPES:
                raise ValueError(f"unknown iou type {iou_type!r}: expected one of {IOU_TYPES}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown COCO evaluation backend {backend!r}: expected one of {BACKENDS}")
        self.coco_gt = copy.deepcopy(coco_gt)
        self.iou_types = list(iou_types)
        self.backend = backend
        self.img_ids: list[int] = []
        # {iou_type: {image_id: [COCO result dicts]}}; the first result set of an image wins.
        self.results: dict[str, dict[int, list[dict]]] = {t: {} for t in self.iou_types}
        self.coco_eval: dict[str, COCOeval] = {t: COCOeval(self.coco_gt, iouType=t) for t in self.iou_types}

    def update(self, predictions: dict) -> None:
        """predictions: {image_id: {"scores" [N], "labels" [N], "boxes" [N,4] absolute xyxy,
        "masks" [N,1,H,W] or [N,H,W] binary (segm only)}}."""
        for image_id, prediction in predictions.items():
            image_id = _as_int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"prediction for image id {image_id}, which the ground truth does not have: "
                                 f"evaluate with the ground truth of the same dataset (get_coco_api_from_dataset)")
            if image_id in self.results[self.iou_types[0]]:
                continue
            self.img_ids.append(image_id)
            for iou_type in self.iou_types:
                self.results[iou_type][image_id] = to_coco_results(image_id, prediction, iou_type)

    def synchronize_between_processes(self) -> None:
        """Merge all ranks' results (rank order, each image once)."""
        gathered = _gather((self.img_ids, self.results))
        img_ids: list[int] = []
        results: dict[str, dict[int, list[dict]]] = {t: {} for t in self.iou_types}
        for rank_ids, rank_results in gathered:
            for image_id in rank_ids:
                if image_id in results[self.iou_types[0]]:
                    continue
                img_ids.append(image_id)
                for iou_type in self.iou_types:
                    results[iou_type][image_id] = rank_results[iou_type][image_id]
        self.img_ids, self.results = img_ids, results

    def accumulate(self) -> None:
        """Evaluate every iou type over the images seen (COCOeval.evaluate + accumulate)."""
        for iou_type in self.iou_types:
            detections = [r for image_id in self.img_ids for r in self.results[iou_type][image_id]]
            evaluator = self._make_eval(iou_type, detections)
            evaluator.params.imgIds = sorted(self.img_ids)
            with contextlib.redirect_stdout(io.StringIO()):
                evaluator.evaluate()
                evaluator.accumulate()
            self.coco_eval[iou_type] = evaluator

    def _make_eval(self, iou_type: str, detections: list[dict]):
        if self.backend == "faster":
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster

            gt = FasterCOCO(copy.deepcopy(self.coco_gt.dataset))
            dt = gt.loadRes(copy.deepcopy(detections)) if detections else _empty_like(gt, FasterCOCO)
            return COCOeval_faster(gt, dt, iouType=iou_type, print_function=print)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = self.coco_gt.loadRes(copy.deepcopy(detections)) if detections else _empty_like(self.coco_gt, COCO)
        return COCOeval(self.coco_gt, dt, iouType=iou_type)

    def summarize(self) -> None:
        """Print the 12-line table per iou type; stats are then the 12 numbers."""
        for iou_type, evaluator in self.coco_eval.items():
            print(f"IoU metric: {iou_type}")
            evaluator.summarize()
            evaluator.stats = np.asarray(evaluator.stats[:12], dtype=np.float64)


def _empty_like(gt, coco_class):
    """A result set with no detections (loadRes refuses an empty list)."""
    empty = coco_class()
    empty.dataset = {"images": list(gt.dataset.get("images", [])), "annotations": [],
                     "categories": copy.deepcopy(gt.dataset.get("categories", []))}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def to_coco_results(image_id: int, prediction: dict, iou_type: str) -> list[dict]:
    """One image's prediction -> COCO result dicts (bbox as absolute xywh; segm as RLE)."""
    scores = prediction["scores"].tolist()
    labels = prediction["labels"].tolist()
    if iou_type == "bbox":
        boxes = prediction["boxes"].double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        return [{"image_id": image_id, "category_id": int(l), "bbox": b, "score": float(s)}
                for b, l, s in zip(xywh, labels, scores)]
    masks = prediction["masks"]
    if masks.dim() == 4:
        masks = masks[:, 0]
    masks = masks.to(torch.uint8).cpu().numpy()
    results = []
    for mask, label, score in zip(masks, labels, scores):
        rle = coco_mask.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("utf-8")
        results.append({"image_id": image_id, "category_id": int(label), "segmentation": rle,
                        "score": float(score)})
    return results
