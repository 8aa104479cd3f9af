"""Detect objects in folders of pictures with a trained DETR checkpoint.

    python predict.py --resume CKPT_OR_URL --img_dirs DIR_OR_FILE [...] --output_dir OUT
                      [--threshold 0.5] [--batch_size 2] [--device cpu]

Writes
- OUT/predictions.json: COCO results format (a list of {image_id, category_id, bbox [x, y, w, h]
  in pixels of the original picture, score}), each also carrying file_name and category_name.
  Loadable by pycocotools: `COCO('OUT/images.json').loadRes('OUT/predictions.json')`.
- OUT/images.json: a COCO dataset skeleton (images: id, file_name, width, height; categories:
  id, name; no annotations) that maps the image ids to files.
- OUT/pictures/<file_name>.png: each picture with boxes, category names and scores drawn (and
  masks for a --masks model), highest scores on top; pictures whose longer side is under 512 px
  are drawn enlarged by a whole factor (the JSON boxes stay in the original pixels).

Inputs (util/pictures.py): folders are searched recursively; file_name is the path inside the
folder prefixed by the folder's name ('photos/a.jpg'), with more parent folders when two inputs
would share a name; the drawn picture keeps the extension ('pictures/photos/a.jpg.png' beside
'pictures/photos/a.png.png'), so no two inputs write one output. Each file is predicted once
however often it is given; OUT/pictures and OUT's JSON files are never read as input; hidden files
are left out. What is skipped is printed with the reason and returned in the summary. Images are
read in the orientation their EXIF tag asks for, as RGB (grayscale, palette, RGBA over white,
CMYK and 16-bit pictures are converted); other files are skipped with a warning. The image is
resized as in validation (short side 800, long side <= 1333, times the checkpoint's --image_scale).

Model-shape flags (--backbone, --enc_layers, --num_queries, --hidden_dim, ...) default to the
ones saved in the checkpoint (`args`), and the shapes of its weights; flags given on the command
line win (util/model_flags.py). By default the model runs with frozen BatchNorm folded into the
convolutions and channels_last (fast.optimize_for_inference; `--no_fuse` runs it as built);
`--inference_backend onnxruntime` runs that model in ONNX Runtime on the CPU instead (exported
once, cached next to the checkpoint). With --batch_size > 1 the batches gather pictures of similar
aspect ratio (`--no_group`: file order). `--threshold` keeps detections whose score is above it;
`--threshold 0` keeps every query (e.g. for COCO-style evaluation). Scores are taken over the
dataset's real categories only (when known), so no detection carries an id that is not a category.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import PIL.Image
import torch

from datasets.transforms import make_detr_transforms
from fast import optimize_for_inference, retain_freed_memory
from models import build_model
from util.checkpoint import CheckpointError, load_checkpoint, load_model_state
from util.cli import HelpFormatter, exit_on_user_error
from util.detections import category_names, detections
from util.device import resolve_device
from util.drawing import draw_enlarged
from util.flag_types import parse_flags, positive_int, probability
from util.model_flags import add_model_flags, apply_checkpoint_args
from util.pictures import aspect_ratio_order, list_pictures, load_rgb


def get_args_parser() -> argparse.ArgumentParser:
    """The run flags of prediction plus the model-shape flags (which default to the checkpoint's)."""
    parser = argparse.ArgumentParser(usage="%(prog)s --resume CKPT --img_dirs DIR [DIR ...] [options]",
                                     description="DETR prediction on folders of pictures",
                                     formatter_class=HelpFormatter)
    run = parser.add_argument_group("prediction")
    run.add_argument("--resume", default="", help="checkpoint path or https/file URL of the trained model")
    run.add_argument("--img_dirs", nargs="+", required=True,
                     help="folders (searched recursively) and/or single picture files")
    run.add_argument("--output_dir", default="predictions",
                     help="where predictions.json, images.json and pictures/ are written")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    run.add_argument("--threshold", type=probability, default=0.5,
                     help="keep detections scoring above this, in [0, 1) (0 keeps every query)")
    run.add_argument("--batch_size", type=positive_int, default=2, help="pictures per forward pass")
    run.add_argument("--no_group", action="store_true",
                     help="batch the pictures in file order; by default batches gather pictures of similar "
                          "aspect ratio (less padding; ids follow the file order either way)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--no_fuse", action="store_true",
                       help="run the model as built, without BatchNorm folding and channels_last "
                            "(outputs differ from the default by fp32 rounding)")
    speed.add_argument("--inference_backend", default="torch", choices=("torch", "onnxruntime"),
                       help="onnxruntime (CPU, box models): the folded model exported once to ONNX, cached "
                            "next to the checkpoint under its weights' hash, and run by ONNX Runtime")
    speed.add_argument("--no_malloc_tuning", action="store_true",
                       help="leave glibc malloc as it is; by default, on the CPU, freed memory stays in the "
                            "process so each forward reuses its pages")
    add_model_flags(parser)
    return parser


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def instance_masks(postprocessors: dict, outputs: dict, found: list[dict], sizes_hw: torch.Tensor,
                   tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Per image, the kept detections' masks [N, H, W] bool at the original size; None for a box model."""
    if "segm" not in postprocessors or "pred_masks" not in outputs:
        return None
    processed = torch.tensor([list(t.shape[-2:]) for t in tensors], device=sizes_hw.device)
    empty = [{} for _ in tensors]  # PostProcessSegm only adds 'masks' [Q, 1, H, W] to these
    with_masks = postprocessors["segm"](empty, outputs, sizes_hw.long(), processed)
    return [r["masks"][f["queries"], 0].bool().cpu() for r, f in zip(with_masks, found)]


def coco_results(image_id: int, file_name: str, size_wh: tuple[int, int], found: dict,
                 names: dict[int, str]) -> tuple[list[dict], torch.Tensor]:
    """COCO results entries of one image (bbox xywh, clipped to the picture) and the clipped xyxy boxes."""
    boxes = found["boxes"].cpu().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size_wh[0])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size_wh[1])
    entries = []
    for (x0, y0, x1, y1), category_id, score in zip(boxes.tolist(), found["labels"].tolist(),
                                                    found["scores"].tolist()):
        entries.append({"image_id": image_id, "category_id": category_id,
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(score, 5), "file_name": file_name,
                        "category_name": names.get(category_id, str(category_id))})
    return entries, boxes


def onnx_cache_dir(resume: str) -> Path:
    """Where the ONNX export of a checkpoint is cached: next to it when it is a local file in a
    writable folder, else the torch hub cache's onnx/ folder (URLs, read-only folders)."""
    local = Path(resume)
    if local.is_file() and os.access(local.parent, os.W_OK):
        return local.parent
    return Path(torch.hub.get_dir()) / "onnx"


def load_model(args: argparse.Namespace, checkpoint: dict, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model in eval mode on `device`, folded (or in ONNX Runtime) as the flags say;
    and its post-processors."""
    if args.inference_backend == "onnxruntime" and (device.type != "cpu" or args.no_fuse or args.masks):
        raise SystemExit("--inference_backend onnxruntime runs the folded box model on the CPU: use --device cpu, "
                         "leave out --no_fuse, and keep --inference_backend torch for a --masks model")
    model, _, postprocessors = build_model(args)
    load_model_state(model, checkpoint["model"], what=str(args.resume))
    model.to(device).eval()
    if args.inference_backend == "onnxruntime":
        model = optimize_for_inference(model, backend="onnxruntime", onnx_cache_dir=onnx_cache_dir(args.resume))
    elif not args.no_fuse:
        optimize_for_inference(model)
    return model, postprocessors


def predict(args: argparse.Namespace, checkpoint: dict) -> dict[str, Any]:
    """Run the model over args.img_dirs and write OUT/predictions.json, images.json, pictures/.

    Returns a summary: images (count), skipped ({path, reason} each), detections (count), seconds.
    """
    out = Path(args.output_dir)
    outputs = [out / "pictures", out / "predictions.json", out / "images.json"]
    files, skipped = list_pictures(args.img_dirs, outputs)  # before any work: a wrong path is reported at once
    for item in skipped:
        print(f"skipping {item['path']}: {item['reason']}")
    device = resolve_device(args.device)
    args.device = str(device)
    if device.type == "cpu" and not args.no_malloc_tuning:
        retain_freed_memory()  # before the model and its activations are allocated
    model, postprocessors = load_model(args, checkpoint, device)
    names = category_names(args, checkpoint)
    valid_ids = sorted(names) if names else None
    transform = make_detr_transforms("val", image_scale=getattr(args, "image_scale", 1.0))

    (out / "pictures").mkdir(parents=True, exist_ok=True)
    order = (list(range(len(files))) if args.no_group or args.batch_size == 1
             else aspect_ratio_order([path for path, _ in files]))
    per_file: dict[int, tuple[dict, list[dict]]] = {}  # file index -> (image entry, its detections)
    unreadable: dict[int, dict] = {}
    done, start = 0, time.perf_counter()
    for chunk in batches(order, args.batch_size):
        loaded = [(index, *files[index], load_rgb(files[index][0])) for index in chunk]
        unreadable.update({index: {"path": str(path), "reason": "not a readable picture"}
                           for index, path, _, picture in loaded if picture is None})
        loaded = [item for item in loaded if item[3] is not None]
        if loaded:
            tensors = [transform(picture, None)[0].to(device) for *_, picture in loaded]
            sizes = torch.tensor([[p.height, p.width] for *_, p in loaded], dtype=torch.float32, device=device)
            with torch.inference_mode():
                outputs = model(tensors)
            found = detections(outputs, sizes, valid_ids, args.threshold)
            masks = instance_masks(postprocessors, outputs, found, sizes, tensors)
            for position, ((index, _, name, picture), found_one) in enumerate(zip(loaded, found)):
                entries = draw_one(out, name, picture, found_one, names, masks[position] if masks else None)
                per_file[index] = ({"file_name": name, "width": picture.width, "height": picture.height}, entries)
        done += len(chunk)
        elapsed = time.perf_counter() - start
        print(f"[{done}/{len(files)}] {done / max(elapsed, 1e-9):.2f} images/s", flush=True)
    skipped += [unreadable[index] for index in sorted(unreadable)]
    images, results = write_json(out, per_file, names)
    summary = {"images": len(images), "skipped": skipped, "detections": len(results),
               "seconds": round(time.perf_counter() - start, 3)}
    print(f"{len(images)} pictures, {len(results)} detections above {args.threshold} -> {out / 'predictions.json'}"
          + (f"; skipped {len(skipped)} file(s) (listed above)" if skipped else ""))
    return summary


def draw_one(out: Path, name: str, picture: PIL.Image.Image, found: dict, names: dict[int, str],
             masks: torch.Tensor | None) -> list[dict]:
    """Write OUT/pictures/<name>.png (the extension kept in the name, so a.jpg and a.png do not
    collide); returns the picture's COCO results entries (image_id set later)."""
    entries, boxes = coco_results(0, name, picture.size, found, names)
    labels = [f"{e['category_name']} {e['score']:.2f}" for e in entries]
    picture_out = out / "pictures" / f"{name}.png"
    picture_out.parent.mkdir(parents=True, exist_ok=True)
    draw_enlarged(picture, boxes, labels, [e["category_id"] for e in entries], masks,
                  [e["score"] for e in entries]).save(picture_out)
    return entries


def write_json(out: Path, per_file: dict[int, tuple[dict, list[dict]]],
               names: dict[int, str]) -> tuple[list[dict], list[dict]]:
    """OUT/predictions.json and OUT/images.json, image ids in file order whatever order the batches ran in."""
    images: list[dict] = []
    results: list[dict] = []
    for index in sorted(per_file):
        image, entries = per_file[index]
        images.append({"id": len(images) + 1, **image})
        for entry in entries:
            entry["image_id"] = images[-1]["id"]
        results += entries
    categories = [{"id": i, "name": n} for i, n in sorted(names.items())] or \
        [{"id": i, "name": str(i)} for i in sorted({r["category_id"] for r in results})]
    (out / "predictions.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    return images, results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parse_flags(parser, argv)
    if not args.resume:
        parser.error("--resume CKPT is required: the checkpoint (path or URL) to predict with")
    try:
        checkpoint = load_checkpoint(args.resume, map_location="cpu")
        args = apply_checkpoint_args(args, get_args_parser, argv, checkpoint)
        return predict(args, checkpoint)
    except CheckpointError as err:  # flags that do not fit the weights: the message lists what differs
        raise SystemExit(f"predict.py: {err}") from err


if __name__ == "__main__":
    with exit_on_user_error():
        main()
