"""Detect objects in a folder of pictures with a trained DETR checkpoint.

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

Model-shape flags (--backbone, --enc_layers, --num_queries, --hidden_dim, ...) default to the
ones saved in the checkpoint (`args`), and the shapes of its weights; flags given on the command
line win. Images are read in the orientation their EXIF tag asks for, as RGB (grayscale,
palette, RGBA over white, CMYK and 16-bit pictures are converted); other files are skipped with
a warning. The image is resized as in validation (short side 800, long side <= 1333, times the
checkpoint's --image_scale).
By default the model runs with frozen BatchNorm folded into the convolutions and channels_last
(models.fuse.optimize_for_inference; `--no_fuse` runs it as built); `--inference_backend onnxruntime`
runs that model in ONNX Runtime on the CPU instead (exported once, cached next to the checkpoint).
On the CPU, freed memory stays in the process (util/allocator.py; `--no_malloc_tuning` keeps
glibc's default). With --batch_size > 1 the batches gather pictures of similar aspect ratio
(`--no_group`: file order).
`--threshold` (default 0.5) keeps detections whose score is above it, in the JSON and in the
pictures; use `--threshold 0` to keep every query (e.g. for COCO-style evaluation). Scores are
taken over the dataset's real categories only (when known), so no detection carries an id that
is not a category.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.ImageOps
import torch

# Run options of this script: never taken from the checkpoint's training args.
RUN_OPTIONS = {"resume", "img_dirs", "output_dir", "device", "threshold", "batch_size", "num_workers",
               "eval", "start_epoch", "finetune", "frozen_weights", "backbone_weights", "seed",
               "world_size", "dist_url", "distributed", "rank", "gpu", "dist_backend", "local_rank"}

COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}


# ---------------------------------------------------------------------------------------------
# Flags


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's flags plus --img_dirs and --threshold; --device defaults to CUDA when present."""
    import main
    from util.cli import HelpFormatter

    parser = argparse.ArgumentParser(usage="%(prog)s --resume CKPT --img_dirs DIR [DIR ...] [options]",
                                     description="DETR prediction on a folder of pictures",
                                     parents=[main.get_args_parser()], formatter_class=HelpFormatter)
    prediction = parser.add_argument_group("prediction")
    prediction.add_argument("--img_dirs", nargs="+", required=True,
                            help="folders (searched recursively) and/or single picture files")
    prediction.add_argument("--threshold", type=float, default=0.5,
                            help="keep detections scoring above this (0 keeps every query)")
    prediction.add_argument("--no_fuse", action="store_true",
                            help="run the model as built: no BatchNorm folding into the convolutions and no "
                                 "channels_last (the fused model's outputs differ by fp32 rounding, ~1e-5)")
    prediction.add_argument("--inference_backend", default="torch", choices=("torch", "onnxruntime"),
                            help="onnxruntime (CPU, box models): the folded model exported once to ONNX, cached "
                                 "next to the checkpoint under its weights' hash, and run by ONNX Runtime "
                                 "(benchmarks/README.md: faster than the torch path on CPU)")
    prediction.add_argument("--no_group", action="store_true",
                            help="batch the pictures in file order; by default batches gather pictures of similar "
                                 "aspect ratio (less padding; outputs are per picture, ids in file order either way)")
    parser.set_defaults(device=None, output_dir="predictions")
    return parser


def explicit_flags(argv: list[str], make_parser: Callable[[], argparse.ArgumentParser] | None = None) -> set[str]:
    """The dests the command line sets itself (so checkpoint values must not replace them).

    Parses `argv` again with a fresh parser (from `make_parser`, default this script's) whose
    defaults are all suppressed: only the flags actually given end up in the namespace.
    """
    probe = (make_parser or get_args_parser)()
    probe._defaults.clear()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(probe.parse_args(argv)))


def shape_args_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Flags fixed by the weights themselves: class count, queries, width, layers, masks, backbone."""
    prefix = "detr." if any(k.startswith("detr.") for k in state_dict) else ""
    found: dict[str, Any] = {"masks": bool(prefix)}
    if f"{prefix}class_embed.weight" in state_dict:
        found["num_classes"] = state_dict[f"{prefix}class_embed.weight"].shape[0] - 1
    if f"{prefix}query_embed.weight" in state_dict:
        found["num_queries"], found["hidden_dim"] = state_dict[f"{prefix}query_embed.weight"].shape

    def count(pattern: str) -> int:
        indices = {k[len(pattern):].split(".")[0] for k in state_dict if k.startswith(pattern)}
        return len(indices)

    for flag, part in (("enc_layers", "encoder"), ("dec_layers", "decoder")):
        layers = count(f"{prefix}transformer.{part}.layers.")
        if layers:
            found[flag] = layers
    linear1 = state_dict.get(f"{prefix}transformer.encoder.layers.0.linear1.weight")
    if linear1 is None:
        linear1 = state_dict.get(f"{prefix}transformer.decoder.layers.0.linear1.weight")
    if linear1 is not None:
        found["dim_feedforward"] = linear1.shape[0]
    found["pre_norm"] = f"{prefix}transformer.encoder.norm.weight" in state_dict
    body = f"{prefix}backbone.0.body."
    bottleneck = f"{body}layer1.0.conv3.weight" in state_dict
    blocks = count(f"{body}layer3.")
    resnet = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101",
              (True, 36): "resnet152"}.get((bottleneck, blocks))
    if resnet:
        found["backbone"] = resnet
    return found


def apply_checkpoint_args(args: argparse.Namespace, explicit: set[str], checkpoint: dict) -> argparse.Namespace:
    """Fill every flag not given explicitly from the checkpoint: its weights' shapes first, then its args."""
    saved = checkpoint.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    inferred = shape_args_from_state_dict(checkpoint["model"])
    for key, value in {**saved, **inferred}.items():
        if key not in explicit and key not in RUN_OPTIONS:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------
# Pictures in


def list_images(paths: list[str]) -> list[tuple[Path, str]]:
    """(path, file_name) for every file under the given folders (recursively) or given directly.

    file_name is the path relative to its folder, prefixed by the folder's name ('photos/a.jpg');
    for a file given directly, its name. Hidden files are left out.
    """
    found: list[tuple[Path, str]] = []
    for given in paths:
        root = Path(given)
        if root.is_file():
            found.append((root, root.name))
        elif root.is_dir():
            for path in sorted(root.rglob("*")):
                relative = path.relative_to(root)
                if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                    found.append((path, str(Path(root.resolve().name) / relative)))
        else:
            raise SystemExit(f"--img_dirs: {given} does not exist")
    return found


def load_rgb(path: Path) -> PIL.Image.Image | None:
    """The picture at `path` as upright RGB, or None (with a warning) if it is not a picture."""
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            image = PIL.ImageOps.exif_transpose(opened)
    except (PIL.UnidentifiedImageError, OSError, ValueError) as err:
        warnings.warn(f"skipping {path}: not a readable picture ({type(err).__name__}: {err})", stacklevel=2)
        return None
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float grayscale: stretch to 8 bits instead of clipping everything above 255.
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / max(high - low, 1e-6) * 255
        image = PIL.Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels hold arbitrary colours; show them as white, as viewers do.
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def upright_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF orientations 5-8 swap the sides), from the header only;
    None for a file PIL cannot open."""
    try:
        with PIL.Image.open(path) as opened:
            width, height = opened.size
            orientation = opened.getexif().get(0x0112, 1)
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def aspect_ratio_order(paths: list[Path]) -> list[int]:
    """Indices of `paths` sorted by height / width (stable), unreadable files last: consecutive
    batches then hold pictures of similar shape, which pad each other little."""
    sizes = [upright_size(path) for path in paths]
    return sorted(range(len(paths)), key=lambda i: (sizes[i] is None, sizes[i][1] / sizes[i][0] if sizes[i] else 0))


# ---------------------------------------------------------------------------------------------
# Categories and post-processing


def category_names(args: argparse.Namespace, checkpoint: dict) -> dict[int, str]:
    """Category id -> name: saved in the checkpoint, else from the dataset's annotations, else COCO's."""
    for source in (checkpoint.get("category_names"), getattr(args, "category_names", None)):
        if source:
            items = source.items() if isinstance(source, dict) else enumerate(source)
            return {int(k): str(v) for k, v in items if v is not None}
    try:
        import datasets

        names = datasets.category_names(args)
        if names:
            return {int(k): str(v) for k, v in names.items()}
    except Exception as err:  # annotations of the training machine are often absent here
        if getattr(args, "dataset_file", "coco") not in ("coco", "coco_panoptic"):
            print(f"note: category names unavailable ({type(err).__name__}: {err}); writing ids")
    if getattr(args, "dataset_file", "coco") == "coco" and args.num_classes == 91:
        return dict(COCO_CATEGORY_NAMES)
    return {}


def detections(outputs: dict[str, torch.Tensor], sizes_hw: torch.Tensor, valid_ids: list[int] | None,
               threshold: float) -> list[dict[str, torch.Tensor]]:
    """Per image: scores [N], labels [N], boxes [N,4] absolute xyxy in original pixels, query index [N].

    Score/label = max softmax probability over the real classes (no-object excluded; when
    `valid_ids` is given, over those category ids only). Only scores above `threshold` are kept.
    """
    prob = outputs["pred_logits"].softmax(-1)[..., :-1]
    if valid_ids is not None:
        keep_class = torch.zeros(prob.shape[-1], dtype=torch.bool, device=prob.device)
        keep_class[[i for i in valid_ids if 0 <= i < prob.shape[-1]]] = True
        prob = prob.masked_fill(~keep_class, 0)
    scores, labels = prob.max(-1)
    cx, cy, w, h = outputs["pred_boxes"].unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    img_h, img_w = sizes_hw.unbind(1)
    boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
    results = []
    for s, l, b in zip(scores, labels, boxes):
        keep = s > threshold
        results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep],
                        "queries": keep.nonzero().flatten()})
    return results


# ---------------------------------------------------------------------------------------------
# Pictures out


def colour_for(category_id: int) -> tuple[int, int, int]:
    """A stable, saturated colour per category (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((category_id * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


# Pictures whose longer side is below this are drawn enlarged (by a whole factor), so that boxes
# and labels stay legible on small inputs (the shapes data is 128 px).
DRAW_MIN_LONG_SIDE = 512


def drawing_scale(size_wh: tuple[int, int]) -> int:
    """The whole factor by which a picture of `size_wh` is enlarged for drawing (1 when large enough)."""
    return max(1, math.ceil(DRAW_MIN_LONG_SIDE / max(size_wh)))


def place_label(box_xyxy: list[float], label_wh: tuple[int, int], canvas_wh: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a `label_wh` label for a box: on top of the box's top-left corner, inside
    the box when there is no room above, and moved left/up as needed to lie inside the picture."""
    (width, height), (canvas_w, canvas_h) = label_wh, canvas_wh
    x = min(max(0.0, box_xyxy[0]), max(0, canvas_w - width))
    y = box_xyxy[1] - height if box_xyxy[1] - height >= 0 else box_xyxy[1]
    y = min(max(0.0, y), max(0, canvas_h - height))
    return round(x), round(y)


def draw_detections(image: PIL.Image.Image, boxes_xyxy: torch.Tensor, labels: list[str], category_ids: list[int],
                    masks: torch.Tensor | None = None, scores: list[float] | None = None) -> PIL.Image.Image:
    """A copy of `image` with each mask tinted, each box outlined and its label written at it.

    boxes_xyxy [N, 4] in `image`'s pixels; masks [N, h, w] bool, resized to the image if needed.
    Boxes then labels are drawn in increasing `scores` order, so the highest-scoring box and label
    are on top; labels stay inside the picture (`place_label`).
    """
    canvas = image.convert("RGB")
    if masks is not None and len(masks):
        overlay = canvas.copy()
        for mask, category_id in zip(masks, category_ids):
            solid = PIL.Image.new("RGB", canvas.size, colour_for(category_id))
            stencil = PIL.Image.fromarray(mask.to(torch.uint8).mul(255).numpy(), mode="L")
            overlay.paste(solid, mask=stencil.resize(canvas.size, PIL.Image.NEAREST))
        canvas = PIL.Image.blend(canvas, overlay, 0.45)
    draw = PIL.ImageDraw.Draw(canvas)
    line = max(1, round(min(canvas.size) / 250))
    font = PIL.ImageFont.load_default(size=max(11, round(max(canvas.size) / 50)))
    order = sorted(range(len(labels)), key=lambda i: scores[i]) if scores is not None else range(len(labels))
    boxes = boxes_xyxy.tolist()
    for i in order:
        draw.rectangle(boxes[i], outline=colour_for(category_ids[i]), width=line)
    for i in order:
        left, top, right, bottom = draw.textbbox((0, 0), labels[i], font=font)
        size = (right - left + 4, bottom - top + 4)  # 2 px padding on each side
        x, y = place_label(boxes[i], size, canvas.size)
        draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), fill=colour_for(category_ids[i]))
        draw.text((x + 2 - left, y + 2 - top), labels[i], fill=(0, 0, 0), font=font)
    return canvas


def draw_enlarged(picture: PIL.Image.Image, boxes_xyxy: torch.Tensor, labels: list[str], category_ids: list[int],
                  masks: torch.Tensor | None = None, scores: list[float] | None = None) -> PIL.Image.Image:
    """`draw_detections` on `picture` enlarged by `drawing_scale` (boxes and masks given at its own size)."""
    factor = drawing_scale(picture.size)
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), PIL.Image.BICUBIC)
    return draw_detections(picture, boxes_xyxy * factor, labels, category_ids, masks, scores)


# ---------------------------------------------------------------------------------------------
# The run


def resolve_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise SystemExit(f"--device {requested}: not a device name (cpu, cuda, cuda:N): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    return device


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


def predict(args: argparse.Namespace, checkpoint: dict) -> dict[str, Any]:
    """Run the model over args.img_dirs and write OUT/predictions.json, images.json, pictures/.

    Returns a summary: images (count), skipped (paths), detections (count), seconds.
    """
    from datasets.transforms import make_detr_transforms
    from models import build_model
    from models.fuse import optimize_for_inference
    from util.checkpoint import load_model_state

    files = list_images(args.img_dirs)  # a wrong path is reported before the model is built
    device = resolve_device(args.device)
    args.device = str(device)
    if device.type == "cpu" and not args.no_malloc_tuning:
        from util.allocator import retain_freed_memory

        retain_freed_memory()  # before the model and its activations are allocated
    if args.inference_backend == "onnxruntime" and (device.type != "cpu" or args.no_fuse or args.masks):
        raise SystemExit("--inference_backend onnxruntime runs the folded box model on the CPU: use --device cpu, "
                         "leave out --no_fuse, and keep --inference_backend torch for a --masks model")
    args.backbone_weights = "checkpoint"  # weights come from the checkpoint; nothing to download
    args.frozen_weights = None
    model, _, postprocessors = build_model(args)
    load_model_state(model, checkpoint["model"], what=str(args.resume))
    model.to(device).eval()
    if args.inference_backend == "onnxruntime":
        model = optimize_for_inference(model, backend="onnxruntime", onnx_cache_dir=onnx_cache_dir(args.resume))
    elif not args.no_fuse:  # BN folded + channels_last: ~2x on CPU for R50 (benchmarks/README.md)
        optimize_for_inference(model)
    names = category_names(args, checkpoint)
    valid_ids = sorted(names) if names else None
    transform = make_detr_transforms("val", image_scale=getattr(args, "image_scale", 1.0))

    out = Path(args.output_dir)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    batch_size = max(1, args.batch_size)
    order = list(range(len(files))) if args.no_group or batch_size == 1 else aspect_ratio_order([p for p, _ in files])
    per_file: dict[int, tuple[dict, list[dict]]] = {}  # file index -> (image entry, its detections)
    skipped: dict[int, str] = {}
    done, start = 0, time.perf_counter()
    for chunk in batches(order, batch_size):
        loaded = [(index, *files[index], load_rgb(files[index][0])) for index in chunk]
        skipped.update({index: str(path) for index, path, _, picture in loaded if picture is None})
        loaded = [item for item in loaded if item[3] is not None]
        if loaded:
            tensors = [transform(picture, None)[0].to(device) for *_, picture in loaded]
            sizes = torch.tensor([[p.height, p.width] for *_, p in loaded], dtype=torch.float32, device=device)
            with torch.inference_mode():
                outputs = model(tensors)
            found = detections(outputs, sizes, valid_ids, args.threshold)
            masks = instance_masks(postprocessors, outputs, found, sizes, tensors)
            for position, ((index, path, name, picture), found_one) in enumerate(zip(loaded, found)):
                entries, boxes = coco_results(0, name, picture.size, found_one, names)  # id set below
                per_file[index] = ({"file_name": name, "width": picture.width, "height": picture.height}, entries)
                labels = [f"{e['category_name']} {e['score']:.2f}" for e in entries]
                picture_out = (out / "pictures" / name).with_suffix(".png")
                picture_out.parent.mkdir(parents=True, exist_ok=True)
                draw_enlarged(picture, boxes, labels, [e["category_id"] for e in entries],
                              masks[position] if masks else None, [e["score"] for e in entries]).save(picture_out)
        done += len(chunk)
        elapsed = time.perf_counter() - start
        print(f"[{done}/{len(files)}] {done / max(elapsed, 1e-9):.2f} images/s", flush=True)
    # Image ids follow the file order whatever order the batches ran in.
    images: list[dict] = []
    results: list[dict] = []
    for index in sorted(per_file):
        image, entries = per_file[index]
        images.append({"id": len(images) + 1, **image})
        for entry in entries:
            entry["image_id"] = images[-1]["id"]
        results += entries
    skipped = [skipped[index] for index in sorted(skipped)]
    categories = [{"id": i, "name": n} for i, n in sorted(names.items())] or \
        [{"id": i, "name": str(i)} for i in sorted({r["category_id"] for r in results})]
    (out / "predictions.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps({"images": images, "annotations": [], "categories": categories}))
    summary = {"images": len(images), "skipped": skipped, "detections": len(results),
               "seconds": round(time.perf_counter() - start, 3)}
    print(f"{len(images)} pictures, {len(results)} detections above {args.threshold} -> {out / 'predictions.json'}"
          + (f"; skipped {len(skipped)} file(s) that are not pictures" if skipped else ""))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from util.checkpoint import CheckpointError, load_checkpoint

    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.resume:
        parser.error("--resume CKPT is required: the checkpoint (path or URL) to predict with")
    try:
        checkpoint = load_checkpoint(args.resume, map_location="cpu")
    except CheckpointError as err:
        raise SystemExit(f"predict.py: {err}") from err
    args = apply_checkpoint_args(args, explicit_flags(argv), checkpoint)
    try:
        return predict(args, checkpoint)
    except CheckpointError as err:  # flags that do not fit the weights: the message lists what differs
        raise SystemExit(f"predict.py: {err}") from err


if __name__ == "__main__":
    from util.cli import exit_on_user_error

    with exit_on_user_error():
        main()
