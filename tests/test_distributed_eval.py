"""Evaluation on 2 gloo processes under a padded DistributedSampler counts each image exactly once.

5 validation images on 2 ranks: the sampler pads to 6, so one image is seen by both ranks. The
merged CocoEvaluator must hold 5 image ids and give the 12 numbers of a single process.
"""
import argparse
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_eval import CocoEvaluator
from util import distributed as du

VAL_SIZE = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_args(root: str) -> argparse.Namespace:
    return argparse.Namespace(dataset_file="shapes", data_path=root, shapes_train_size=1, shapes_val_size=VAL_SIZE,
                              shapes_image_size=64, image_scale=0.1, masks=False, num_classes=None)


def _predictions(target: dict) -> dict:
    """Fixed detections for one image: its boxes shifted by an id-dependent amount, plus one miss."""
    image_id = int(target["image_id"])
    h, w = target["orig_size"].tolist()
    gt = target["boxes"] * torch.tensor([w, h, w, h], dtype=torch.float32)  # normalised cxcywh -> absolute
    xyxy = torch.cat([gt[:, :2] - gt[:, 2:] / 2, gt[:, :2] + gt[:, 2:] / 2], dim=1) + (image_id % 3)
    boxes = torch.cat([xyxy, torch.tensor([[0.0, 0.0, w / 4, h / 4]])])
    labels = torch.cat([target["labels"], target["labels"][:1] if len(target["labels"]) else torch.tensor([1])])
    scores = torch.linspace(0.9, 0.3, len(boxes))
    return {image_id: {"scores": scores, "labels": labels, "boxes": boxes}}


def _evaluate(dataset, indices) -> CocoEvaluator:
    evaluator = CocoEvaluator(get_coco_api_from_dataset(dataset), ["bbox"])
    for index in indices:
        evaluator.update(_predictions(dataset[index][1]))
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def _rank_worker(rank: int, world_size: int, port: int, root: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = argparse.Namespace(device="cpu", dist_url="env://", world_size=1)
    du.init_distributed_mode(args)
    dataset = build_dataset("val", _data_args(root))
    indices = list(DistributedSampler(dataset, shuffle=False))
    evaluator = _evaluate(dataset, indices)
    du.cleanup()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"indices": indices, "img_ids": evaluator.img_ids,
                   "stats": evaluator.coco_eval["bbox"].stats.tolist()}, f)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    build_dataset("val", _data_args(str(root)))  # generate once, before the ranks start
    return str(root)


def test_padded_sampler_counts_each_image_once(shapes_root, tmp_path):
    mp.spawn(_rank_worker, args=(2, _free_port(), shapes_root, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    seen = [i for r in ranks for i in r["indices"]]
    assert len(seen) == 6 and len(set(seen)) == VAL_SIZE  # the sampler did repeat one image

    dataset = build_dataset("val", _data_args(shapes_root))
    single = _evaluate(dataset, range(VAL_SIZE))
    expected_ids = sorted(get_coco_api_from_dataset(dataset).getImgIds())
    for r in ranks:
        assert sorted(r["img_ids"]) == expected_ids
        assert len(r["img_ids"]) == VAL_SIZE
        np.testing.assert_array_equal(np.array(r["stats"]), single.coco_eval["bbox"].stats)
    assert single.coco_eval["bbox"].stats[0] > 0.1  # the detections are scored, not all -1


def test_a_duplicated_image_would_change_the_numbers(shapes_root):
    """The check above can fail: scoring one image's detections twice lowers AP (extra false positives)."""
    dataset = build_dataset("val", _data_args(shapes_root))
    single = _evaluate(dataset, range(VAL_SIZE))
    evaluator = CocoEvaluator(get_coco_api_from_dataset(dataset), ["bbox"])
    for index in range(VAL_SIZE):
        evaluator.update(_predictions(dataset[index][1]))
    first_id = evaluator.img_ids[0]
    evaluator.results["bbox"][first_id] = evaluator.results["bbox"][first_id] * 2
    evaluator.accumulate()
    evaluator.summarize()
    assert not np.array_equal(evaluator.coco_eval["bbox"].stats, single.coco_eval["bbox"].stats)
