"""Training data pipeline (decode + transforms + collate) in images/s: the project's path against plain PIL.

Both read the same generated JPEGs (640x480, a few boxes each) in the same order, one torch thread (a
DataLoader worker's), batch 2, the same Python random seed per round, interleaved:
  project  datasets.coco.decode_image -> datasets.transforms.make_detr_transforms -> collate_fn
  pil      pil_reference.py: PIL decode -> the same recipe on PIL images -> padding
for the train recipe (flip, multi-scale resize, crop) and the val recipe (short side 800). Prints img/s,
the ratio, and ms per image in decode, transforms and collate.

    python benchmarks/bench_data.py
"""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

import pil_reference
from common import base_parser, print_table, setup, summarize, time_interleaved, write_json

BATCH = 2
STAGES = ("decode", "transforms", "collate")


def make_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[tuple[Path, dict]]:
    """Write `count` JPEGs of smooth content plus noise (photo-like entropy), with targets (boxes xyxy absolute)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)).save(
            path, quality=90)
        n = int(rng.integers(1, 8))
        x0, y0 = rng.uniform(0, width * 0.7, n), rng.uniform(0, height * 0.7, n)
        boxes = torch.as_tensor(np.stack([x0, y0, x0 + rng.uniform(10, width * 0.3, n),
                                          y0 + rng.uniform(10, height * 0.3, n)], 1), dtype=torch.float32)
        samples.append((path, {
            "boxes": boxes, "labels": torch.as_tensor(rng.integers(1, 91, n), dtype=torch.int64),
            "image_id": torch.tensor([i]), "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
            "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width])}))
    return samples


def make_pipeline(samples: list[tuple[Path, dict]], decode: Callable, transform: Callable,
                  collate: Callable) -> Callable[[], None]:
    """A callable running every sample through decode, transform and collate in batches of BATCH, seeding
    Python's and torch's random with its call count first; `run.stages` keeps seconds per stage per call."""
    stages: list[dict[str, float]] = []

    def run() -> None:
        random.seed(len(stages))
        torch.manual_seed(len(stages))
        seconds = dict.fromkeys(STAGES, 0.0)
        for start in range(0, len(samples), BATCH):
            items = []
            for path, target in samples[start:start + BATCH]:
                began = time.perf_counter()
                image = decode(path)
                decoded = time.perf_counter()
                items.append(transform(image, {k: v.clone() for k, v in target.items()}))
                seconds["decode"] += decoded - began
                seconds["transforms"] += time.perf_counter() - decoded
            began = time.perf_counter()
            collate(items)
            seconds["collate"] += time.perf_counter() - began
        stages.append(seconds)

    run.stages = stages
    return run


def main() -> None:
    from datasets.coco import decode_image
    from datasets.transforms import make_detr_transforms
    from util.nested_tensor import collate_fn

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="number of JPEGs (default 100; --quick 4)")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT of the JPEGs (default 640x480; --quick 160x120)")
    args = parser.parse_args()
    args.threads = 1 if args.threads is None else args.threads  # a DataLoader worker's; PIL is single-threaded too
    _, warmup, repeats, info = setup(args, 0 if args.quick else 1, 1 if args.quick else 3)
    count = args.images or (4 if args.quick else 100)
    width, height = (int(v) for v in (args.size or ("160x120" if args.quick else "640x480")).split("x"))
    print(f"{count} JPEGs of {width}x{height}, batch {BATCH}, one process (the data work runs on the CPU)", flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_jpegs(Path(tmp), count, width, height)
        for image_set in ("train", "val"):
            pil_transform = pil_reference.train_transform if image_set == "train" else pil_reference.val_transform
            modes = {"project": make_pipeline(samples, decode_image, make_detr_transforms(image_set), collate_fn),
                     "pil": make_pipeline(samples, pil_reference.decode, pil_transform, pil_reference.collate)}
            rows = summarize(time_interleaved(modes, warmup, repeats), "pil")
            for name, row in rows.items():
                timed = modes[name].stages[warmup:]
                row["img_per_s"] = count / row["median_s"]
                row.update({f"{stage}_ms_per_img": 1000 * statistics.median([s[stage] for s in timed]) / count
                            for stage in STAGES})
            results[image_set] = rows
            print_table(f"{image_set} recipe, {count} images, median of {repeats} (warm-up {warmup})", rows,
                        [("img/s", "img_per_s", ".1f"), ("vs pil", "speedup", ".2f")]
                        + [(f"{stage} ms", f"{stage}_ms_per_img", ".2f") for stage in STAGES])
    write_json("data", args, info, {"images": count, "width": width, "height": height, "batch": BATCH,
                                    "warmup": warmup, "repeats": repeats}, results)


if __name__ == "__main__":
    main()
