"""Training data pipeline (decode + transforms + collate) in images/s: the project's path versus plain PIL.

Both paths read the same generated JPEGs (COCO-like 640x480 by default, a few boxes each) in the
same order, in one process with one torch thread (as in a DataLoader worker; --threads to
change), batch 2, the same Python random seed per round for both paths:
  project   datasets.coco.decode_image (torchvision.io) -> datasets.transforms.make_detr_transforms
            -> util.misc.collate_fn
  pil       benchmarks/pil_reference.py: PIL decode -> the same recipe on PIL images -> padding
for the train recipe (random flip / multi-scale resize / crop) and the val recipe (resize to 800).

    python benchmarks/bench_data.py                 # 100 images, 640x480
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pil_reference
from common import base_parser, machine_info, median, print_machine, setup, write_json

BATCH = 2


def make_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> list[tuple[Path, dict]]:
    """Write `count` JPEGs with smooth content plus noise (roughly photo-like entropy) and box targets."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        n = int(rng.integers(1, 8))
        x0 = rng.uniform(0, width * 0.7, n)
        y0 = rng.uniform(0, height * 0.7, n)
        boxes = np.stack([x0, y0, x0 + rng.uniform(10, width * 0.3, n), y0 + rng.uniform(10, height * 0.3, n)], 1)
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        target = {
            "boxes": boxes, "labels": torch.as_tensor(rng.integers(1, 91, n), dtype=torch.int64),
            "image_id": torch.tensor([i]), "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
            "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width]),
        }
        samples.append((path, target))
    return samples


class StageClock:
    """Accumulates seconds per stage (decode, transforms, collate) over one pass."""

    def __init__(self):
        self.seconds = {"decode": 0.0, "transforms": 0.0, "collate": 0.0}
        self._last = 0.0

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now


def run_pipeline(samples: list[tuple[Path, dict]], decode, transform, collate) -> dict[str, float]:
    """Decode, transform and collate all samples in batches of BATCH; returns seconds per stage."""
    clock = StageClock()
    for start in range(0, len(samples), BATCH):
        items = []
        for path, target in samples[start:start + BATCH]:
            clock.start()
            image = decode(path)
            clock.lap("decode")
            items.append(transform(image, {k: v.clone() for k, v in target.items()}))
            clock.lap("transforms")
        clock.start()
        collate(items)
        clock.lap("collate")
    return clock.seconds


def project_pipeline(image_set: str):
    """Callable(samples) running the project's decode + transforms + collate over all samples."""
    from datasets.coco import decode_image
    from datasets.transforms import make_detr_transforms
    from util.misc import collate_fn

    transforms = make_detr_transforms(image_set)
    return lambda samples: run_pipeline(samples, decode_image, transforms, collate_fn)


def pil_pipeline(image_set: str):
    """Callable(samples) running the plain-PIL reference over all samples."""
    transform = pil_reference.train_transform if image_set == "train" else pil_reference.val_transform
    return lambda samples: run_pipeline(samples, lambda p: pil_reference.decode(str(p)), transform,
                                        pil_reference.collate)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="number of JPEGs (default 100; quick 4)")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT of the JPEGs (default 640x480; quick 160x120)")
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1  # what each DataLoader worker runs with; PIL is single-threaded too
    device = setup(args)
    count = args.images or (4 if args.quick else 100)
    width, height = (int(v) for v in (args.size or ("160x120" if args.quick else "640x480")).split("x"))
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)

    info = machine_info(device)
    print_machine(info)
    print(f"{count} JPEGs of {width}x{height}, batch {BATCH}, single process "
          f"(data work runs on the CPU whatever --device says)", flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_jpegs(Path(tmp), count, width, height)
        for image_set in ("train", "val"):
            paths = {"project": project_pipeline(image_set), "pil": pil_pipeline(image_set)}
            times: dict[str, list[float]] = {name: [] for name in paths}
            stages: dict[str, list[dict]] = {name: [] for name in paths}
            for round_index in range(warmup + repeats):
                for name, run in paths.items():
                    # Same random draws per round for both paths (both use Python's random in the
                    # original's order, so they mostly pick the same sizes).
                    random.seed(round_index)
                    torch.manual_seed(round_index)
                    start = time.perf_counter()
                    seconds = run(samples)
                    if round_index >= warmup:
                        times[name].append(time.perf_counter() - start)
                        stages[name].append(seconds)
            rows = {name: {"median_s": median(t), "img_per_s": count / median(t), "times_s": t,
                           "ms_per_img": {stage: 1000 * median([s[stage] for s in stages[name]]) / count
                                          for stage in stages[name][0]}}
                    for name, t in times.items()}
            ratio = rows["project"]["img_per_s"] / rows["pil"]["img_per_s"]
            rows["project_over_pil"] = ratio
            results[image_set] = rows
            print(f"{image_set:5s} recipe: project {rows['project']['img_per_s']:7.1f} img/s, "
                  f"PIL {rows['pil']['img_per_s']:7.1f} img/s, ratio {ratio:.2f}x", flush=True)
            for name in paths:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in rows[name]["ms_per_img"].items())
                print(f"      {name:8s} ms/img: {parts}", flush=True)

    write_json("data", {
        "benchmark": "data", "machine": info, "quick": args.quick,
        "config": {"images": count, "width": width, "height": height, "batch": BATCH,
                   "warmup": warmup, "repeats": repeats},
        "results": results,
    }, args.out)


if __name__ == "__main__":
    main()
