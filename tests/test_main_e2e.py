"""main.py end to end on the generated shapes data with a tiny model (resnet18, width 32, 1+1 layers).

- training writes the original's run directory (files, JSON keys, checkpointNNNN on lr drops);
- --resume continues at the next epoch with the optimizer and scheduler state;
- --eval writes eval.pth holding the same numbers as the training run's last evaluation;
- engine.evaluate's COCO numbers equal pycocotools' COCOeval run directly on the same detections;
- --masks trains and evaluates segm.
"""
import json
import random

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

import datasets
import main
from engine import evaluate
from models import build_model
from util.plot_utils import load_eval
from util.checkpoint import load_checkpoint

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "8", "--image_scale", "0.16",
        "--num_workers", "0", "--device", "cpu", "--dataset_file", "shapes", "--shapes_train_size", "4",
        "--shapes_val_size", "2", "--batch_size", "2", "--print_freq", "100"]


def _args(*extra: str):
    return main.get_args_parser().parse_args([*TINY, *extra])


def _log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run with --lr_drop 1 (the lr drops after every epoch)."""
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "run"
    main.main(_args("--data_path", str(tmp / "shapes"), "--epochs", "2", "--lr_drop", "1", "--output_dir", str(out)))
    return tmp, out


def test_run_directory_layout(run):
    tmp, out = run
    names = sorted(p.name for p in out.iterdir())
    # (epoch + 1) % lr_drop == 0 after both epochs -> checkpoint0000 and checkpoint0001
    # checkpoint_best.pth: the first evaluation is always a new best
    # .run.lock: the run's hold on the folder (util/run_lock.py)
    assert names == [".run.lock", "checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth", "checkpoint_best.pth", "eval",
                     "log.txt", "tensorboard"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["000.pth", "latest.pth"]  # epoch % 50 == 0
    assert any((out / "tensorboard").iterdir())

    lines = _log(out)
    assert [line["epoch"] for line in lines] == [0, 1]
    for line in lines:
        for key in ["train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_class_error",
                    "train_lr", "test_loss", "test_class_error", "n_parameters"]:
            assert key in line, key
        assert len(line["test_coco_eval_bbox"]) == 12
        assert all(k.startswith(("train_", "test_")) or k in ("epoch", "n_parameters") for k in line)
    assert lines[0]["train_lr"] == pytest.approx(1e-4) and lines[1]["train_lr"] == pytest.approx(1e-5)

    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args", "rng_state"} <= checkpoint.keys()
    assert checkpoint["epoch"] == 1 and checkpoint["args"].num_classes == checkpoint["model"]["class_embed.bias"].numel() - 1
    assert len(checkpoint["optimizer"]["param_groups"]) == 2
    assert checkpoint["category_names"] == {1: "circle", 2: "square", 3: "triangle"}  # predict.py labels with these
    groups = checkpoint["optimizer"]["param_groups"]  # non-backbone at --lr, backbone at --lr_backbone, x0.1 twice
    assert (groups[0]["lr"], groups[1]["lr"]) == (pytest.approx(1e-6), pytest.approx(1e-7))
    assert load_checkpoint(out / "checkpoint0000.pth")["epoch"] == 0

    latest = load_eval(out / "eval" / "latest.pth")
    assert latest["precision"].shape[0] == 10  # the 10 IoU thresholds of COCOeval


def test_resume_continues_with_optimizer_and_scheduler(run, tmp_path):
    tmp, first = run
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "log.txt").write_text((first / "log.txt").read_text())
    before = load_checkpoint(first / "checkpoint.pth")
    main.main(_args("--data_path", str(tmp / "shapes"), "--epochs", "3", "--lr_drop", "1", "--output_dir", str(out),
                    "--resume", str(first / "checkpoint.pth")))
    lines = _log(out)
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert lines[2]["train_lr"] == pytest.approx(1e-6)  # third drop: the scheduler was restored
    after = load_checkpoint(out / "checkpoint.pth")
    assert after["epoch"] == 2
    # AdamW's step counter went on from the checkpoint's (2 iterations per epoch)
    steps_before = next(iter(before["optimizer"]["state"].values()))["step"].item()
    steps_after = next(iter(after["optimizer"]["state"].values()))["step"].item()
    assert (steps_before, steps_after) == (4, 6)
    assert sorted(p.name for p in out.glob("checkpoint0*.pth")) == ["checkpoint0002.pth"]


def test_eval_writes_eval_pth_with_the_runs_numbers(run, tmp_path):
    tmp, first = run
    out = tmp_path / "evaluated"
    stats = main.main(_args("--data_path", str(tmp / "shapes"), "--eval", "--output_dir", str(out),
                            "--resume", str(first / "checkpoint.pth")))
    assert sorted(p.name for p in out.iterdir()) == ["eval.pth"]
    assert stats["coco_eval_bbox"] == pytest.approx(_log(first)[-1]["test_coco_eval_bbox"])
    saved = load_eval(out / "eval.pth")
    latest = load_eval(first / "eval" / "latest.pth")
    np.testing.assert_array_equal(saved["precision"], latest["precision"])


class _FixedDetections(torch.nn.Module):
    """A bbox post-processor that hands out prepared detections in loader order."""

    def __init__(self, per_batch):
        super().__init__()
        self.per_batch = list(per_batch)

    def forward(self, outputs, target_sizes):
        return self.per_batch.pop(0)


def test_coco_numbers_equal_cocoeval_on_the_same_detections(tmp_path):
    args = _args("--data_path", str(tmp_path / "shapes"), "--shapes_val_size", "6")
    dataset = datasets.build_dataset("val", args)
    args.num_classes = datasets.infer_num_classes(args)
    args.distributed, args.world_size = False, 1
    coco_gt = datasets.get_coco_api_from_dataset(dataset)
    model, criterion, postprocessors = build_model(args)
    _, _, loader = main._make_loaders(args, dataset, dataset)

    # Detections: each ground-truth box jittered (some with the wrong class), plus random boxes.
    rng = random.Random(0)
    per_batch, results = [], []
    for _, targets in loader:
        batch = []
        for target in targets:
            image_id = int(target["image_id"])
            h, w = target["orig_size"].tolist()
            boxes, scores, labels = [], [], []
            for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id)):
                x, y, bw, bh = ann["bbox"]
                j = [rng.uniform(-0.15, 0.15) * s for s in (bw, bh, bw, bh)]
                boxes.append([x + j[0], y + j[1], x + bw + j[2], y + bh + j[3]])
                labels.append(ann["category_id"] if rng.random() < 0.8 else 1 + ann["category_id"] % 3)
                scores.append(rng.random())
            for _ in range(3):
                x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
                boxes.append([x0, y0, x0 + rng.uniform(4, w / 2), y0 + rng.uniform(4, h / 2)])
                labels.append(rng.choice(sorted(coco_gt.getCatIds())))
                scores.append(rng.random() * 0.5)
            batch.append({"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)})
            results += [{"image_id": image_id, "category_id": int(c), "score": float(s),
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                        for b, s, c in zip(torch.tensor(boxes).tolist(), torch.tensor(scores).tolist(), labels)]
        per_batch.append(batch)

    stats, _ = evaluate(model, criterion, {"bbox": _FixedDetections(per_batch)}, loader, coco_gt, "cpu", "")

    direct = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    assert stats["coco_eval_bbox"][0] > 0.2  # a real, non-trivial score
    np.testing.assert_allclose(stats["coco_eval_bbox"], direct.stats, rtol=0, atol=1e-12)


def test_masks_run_trains_and_evaluates_segm(tmp_path):
    out = tmp_path / "masks"
    # the mask head's GroupNorm needs hidden_dim a multiple of 128 and hidden_dim + nheads of 8
    stats = main.main(_args("--data_path", str(tmp_path / "shapes"), "--masks", "--epochs", "1",
                            "--hidden_dim", "128", "--nheads", "8", "--output_dir", str(out)))
    line = _log(out)[0]
    assert "train_loss_mask" in line and "train_loss_dice" in line
    assert len(line["test_coco_eval_masks"]) == 12 and len(stats["coco_eval_masks"]) == 12
    assert "detr.class_embed.weight" in load_checkpoint(out / "checkpoint.pth")["model"]


def test_panoptic_run_reports_pq(tmp_path):
    out = tmp_path / "panoptic"
    stats = main.main(_args("--data_path", str(tmp_path / "shapes"), "--dataset_file", "shapes_panoptic", "--masks",
                            "--epochs", "1", "--hidden_dim", "128", "--nheads", "8", "--output_dir", str(out)))
    line = _log(out)[0]
    for key in ("PQ_all", "PQ_th", "PQ_st"):
        assert set(line[f"test_{key}"]) == {"pq", "sq", "rq", "n"} and stats[key] == line[f"test_{key}"]
    # shapes_panoptic: 3 thing and 2 stuff classes
    assert (line["test_PQ_th"]["n"], line["test_PQ_st"]["n"]) == (3, 2)
    assert len(line["test_coco_eval_bbox"]) == 12
    assert (out / "panoptic_eval" / "predictions.json").is_file()


def test_two_stage_panoptic_box_model_then_frozen_mask_head(tmp_path):
    """Stage 1 trains boxes on shapes_panoptic; stage 2 trains only the mask head on the frozen box
    model; evaluation reports box AP, segm AP (against the instance polygons) and PQ."""
    data, box_run, segm_run = tmp_path / "shapes", tmp_path / "box", tmp_path / "segm"
    common = ["--data_path", str(data), "--dataset_file", "shapes_panoptic", "--hidden_dim", "128", "--nheads", "8"]
    main.main(_args(*common, "--epochs", "1", "--output_dir", str(box_run)))
    box_model = load_checkpoint(box_run / "checkpoint.pth")["model"]

    main.main(_args(*common, "--masks", "--frozen_weights", str(box_run / "checkpoint.pth"), "--epochs", "2",
                    "--lr_drop", "1", "--output_dir", str(segm_run)))
    first, last = (load_checkpoint(segm_run / f"checkpoint000{e}.pth")["model"] for e in (0, 1))
    for name, tensor in box_model.items():  # every box-model tensor (weights and BN buffers) is untouched
        assert torch.equal(first[f"detr.{name}"], tensor) and torch.equal(last[f"detr.{name}"], tensor), name
    head = [k for k in last if not k.startswith("detr.")]
    assert head and all(k.startswith(("bbox_attention.", "mask_head.")) for k in head)
    assert any(not torch.equal(first[k], last[k]) for k in head)  # the mask head did train

    lines = _log(segm_run)
    n_head = sum(last[k].numel() for k in head if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert lines[0]["n_parameters"] == n_head  # only the mask head is trainable
    for line in lines:
        assert len(line["test_coco_eval_bbox"]) == 12 and len(line["test_coco_eval_masks"]) == 12
        assert line["test_PQ_th"]["n"] == 3 and line["test_PQ_st"]["n"] == 2
    predictions = json.loads((segm_run / "panoptic_eval" / "predictions.json").read_text())
    pngs = sorted((segm_run / "panoptic_eval").rglob("*.png"))
    assert len(predictions["annotations"]) == 2 and len(pngs) == 2


def _frozen_norm_backbone_file(path):
    """A resnet18 state dict with non-trivial BatchNorm statistics: loaded by path, its norms are frozen."""
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    torch.save(resnet.state_dict(), path)
    return path


def test_fast_training_default_matches_the_plain_run(tmp_path, malloc_tuning_calls):
    """The default (fast.optimize_for_training: frozen BN inside the conv, channels_last,
    sparse dropout) against --no_fast_train: with torch's dropout draws
    (--no_sparse_dropout) the same first loss to 1e-5 (one step: 2 images, batch 2); with the
    default's own draws another loss; checkpoints that load strictly into the model as built."""
    weights = _frozen_norm_backbone_file(tmp_path / "resnet18.pth")
    runs = {}
    for name, extra in (("plain", ["--no_fast_train", "--no_malloc_tuning"]),
                        ("fast", ["--no_sparse_dropout"]), ("fast_sparse", [])):
        out = tmp_path / name
        main.main(_args("--data_path", str(tmp_path / "shapes"), "--epochs", "1", "--output_dir", str(out),
                        "--backbone_weights", str(weights), "--shapes_train_size", "2", *extra))
        runs[name] = (_log(out)[0], load_checkpoint(out / "checkpoint.pth"))
    plain_log, plain = runs["plain"][0], runs["plain"][1]["model"]
    assert len(malloc_tuning_calls) == 2  # on the CPU glibc keeps freed memory, except with --no_malloc_tuning
    assert abs(runs["fast_sparse"][0]["train_loss"] - plain_log["train_loss"]) > 1e-5  # other dropout draws
    for name in ("fast", "fast_sparse"):
        fast_log, checkpoint = runs[name]
        fast = checkpoint["model"]
        assert fast["backbone.0.body.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
        assert list(fast) == list(plain)
        if name != "fast_sparse":  # same draws: same loss and weights
            assert abs(fast_log["train_loss"] - plain_log["train_loss"]) < 1e-5, name
            for key, tensor in plain.items():
                assert torch.allclose(fast[key].float(), tensor.float(), atol=1e-4), key
        model, _, _ = build_model(checkpoint["args"])  # plain layout: strict load of the fast run's weights
        model.load_state_dict(fast, strict=True)
    stats = {}
    for name, extra in (("plain", []), ("fused", ["--fuse_eval"])):
        stats[name] = main.main(_args("--data_path", str(tmp_path / "shapes"), "--shapes_train_size", "2", "--eval",
                                      "--resume", str(tmp_path / "fast" / "checkpoint.pth"), *extra))
    assert stats["fused"]["loss"] == pytest.approx(stats["plain"]["loss"], rel=1e-4)
    assert stats["fused"]["coco_eval_bbox"] == pytest.approx(stats["plain"]["coco_eval_bbox"], abs=1e-3)
