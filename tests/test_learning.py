"""DETR learns for real: a small model memorises 16 shapes images to AP50 >= 0.5 in 400 iterations.

Everything is the project's own code (main.py's flags and seeding, build_model, SetCriterion,
engine.train_one_epoch and engine.evaluate with CocoEvaluator); only the augmentation is the
validation transform, since the images are evaluated as they were seen.

Recipe found by measurement (seed 0/1/2, 2 CPU threads, ~70 s of training): R18 from scratch with
trainable BatchNorm, 128-d, 2+2 layers, 10 queries, batch 4, short side 128 px, dropout 0,
--lr 1e-4 --lr_backbone 1e-4. AP50 after 100/200/300/400 iterations: 0.39/0.67/0.91/0.93
(seed 0), 0.31/0.70/0.80/0.86 (seed 1), 0.32/0.61/0.86/0.89 (seed 2). The original's
settings for these (--lr_backbone 1e-5, dropout 0.1, the train augmentation) reach only AP50
0.002 after 400 iterations; --lr_backbone 1e-4 with the augmentation 0.12.
"""
import contextlib
import io

import torch
from torch.utils.data import DataLoader

import main
from datasets import shapes
from datasets.coco import CocoDetection
from datasets.transforms import make_detr_transforms
from engine import evaluate, train_one_epoch
from models import build_model
from util.nested_tensor import collate_fn

N_IMAGES = 16
EPOCHS = 100  # 4 batches of 4 per epoch: 400 iterations


def test_small_detr_memorises_sixteen_images(tmp_path):
    root = shapes.ensure_shapes(tmp_path / "shapes", train_size=N_IMAGES, val_size=1, image_size=128)
    args = main.get_args_parser().parse_args([
        "--dataset_file", "shapes", "--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none",
        "--hidden_dim", "128", "--enc_layers", "2", "--dec_layers", "2", "--dim_feedforward", "256",
        "--num_queries", "10", "--batch_size", "4", "--image_scale", "0.16", "--dropout", "0",
        "--lr", "1e-4", "--lr_backbone", "1e-4", "--seed", "0"])
    args.num_classes, args.thing_ids = 4, None
    main.seed_all(args.seed)
    model, criterion, postprocessors = build_model(args)
    dataset = CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json",
                            transforms=make_detr_transforms("val", args.image_scale))
    assert len(dataset) == N_IMAGES
    generator = torch.Generator().manual_seed(0)
    train_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate_fn,
                              generator=generator)
    eval_loader = DataLoader(dataset, batch_size=8, collate_fn=collate_fn)  # the same 16 images

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if "backbone" not in n]},
                                   {"params": [p for n, p in named if "backbone" in n], "lr": args.lr_backbone}],
                                  lr=args.lr, weight_decay=args.weight_decay)

    def ap50() -> float:
        with contextlib.redirect_stdout(io.StringIO()):
            stats, _ = evaluate(model, criterion, postprocessors, eval_loader, dataset.coco, "cpu", str(tmp_path),
                                print_freq=10**9)
        return stats["coco_eval_bbox"][1]

    before = ap50()
    losses = []
    with contextlib.redirect_stdout(io.StringIO()):
        for epoch in range(EPOCHS):
            stats = train_one_epoch(model, criterion, train_loader, optimizer, "cpu", epoch, args.clip_max_norm,
                                    print_freq=10**9)
            losses.append(stats["loss"])
    after = ap50()
    print(f"AP50 {before:.3f} -> {after:.3f}; loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    assert before < 0.05
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert after >= 0.5, f"AP50 on the memorised images is {after:.3f} after {EPOCHS * 4} iterations"
