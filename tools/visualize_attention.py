"""Where each detection looks: the decoder's last-layer cross-attention over the picture.

    python tools/visualize_attention.py --resume CKPT_OR_URL --image PICTURE [--out attention.png]
                                        [--threshold 0.7] [--top_k 6] [--max_side 480] [--device cpu]

Writes one PNG, a row of panels of the (upright, RGB) picture resized so its long side is
--max_side: first the picture with the detected boxes, then, per detection (the --top_k best
scoring above --threshold; the single best one when none is), the attention of that object
query over the picture (mean over heads, bilinearly upsampled from the feature map, drawn as
a heat map) with its box. The PNG is (1 + detections) * panel width by panel height pixels.
Model-shape flags come from the checkpoint as in predict.py (util/model_flags.py; explicit flags win).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib import colormaps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.transforms import make_detr_transforms  # noqa: E402
from models import build_model  # noqa: E402
from util.checkpoint import CheckpointError, load_checkpoint, load_model_state  # noqa: E402
from util.cli import HelpFormatter, exit_on_user_error  # noqa: E402
from util.detections import category_names, detections  # noqa: E402
from util.device import resolve_device  # noqa: E402
from util.drawing import draw_detections  # noqa: E402
from util.flag_types import parse_flags, positive_int, probability  # noqa: E402
from util.model_flags import add_model_flags, apply_checkpoint_args  # noqa: E402
from util.pictures import load_rgb  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """The tool's own flags plus the model-shape flags (which default to the checkpoint's)."""
    parser = argparse.ArgumentParser(usage="%(prog)s --resume CKPT --image PICTURE [options]",
                                     description="DETR decoder attention maps", formatter_class=HelpFormatter)
    view = parser.add_argument_group("attention maps")
    view.add_argument("--resume", default="", help="checkpoint path or https/file URL of the trained model")
    view.add_argument("--image", required=True, help="the picture to look at")
    view.add_argument("--out", default="attention.png", help="PNG file to write")
    view.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    view.add_argument("--threshold", type=probability, default=0.7,
                      help="detections scoring above this, in [0, 1), are shown")
    view.add_argument("--top_k", type=positive_int, default=6, help="at most this many detections (best first)")
    view.add_argument("--max_side", type=positive_int, default=480, help="long side of each panel, in pixels")
    add_model_flags(parser)
    return parser


@contextlib.contextmanager
def cross_attention_weights(model: torch.nn.Module) -> Iterator[Callable[[], torch.Tensor]]:
    """Within the block, capture the last decoder layer's cross-attention weights [B, Q, S].

    Yields a function returning the weights of the latest forward pass (mean over heads). The
    model's attention computes no weights on its fast path, so the hook calls the layer's
    `multihead_attn` again on the same inputs with need_weights=True (models/transformer.py).
    """
    attention = model.transformer.decoder.layers[-1].multihead_attn
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            names = ("query", "key", "value", "key_padding_mask")
            call = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
            weights = module.forward(**call, need_weights=True)[1]  # .forward: no hook recursion
        store["weights"] = weights

    handle = attention.register_forward_hook(hook, with_kwargs=True)
    try:
        yield lambda: store["weights"]
    finally:
        handle.remove()


def attention_maps(model: torch.nn.Module, image: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Run `model` on one normalised image [3,H,W]; return (outputs, attention [Q, h, w]).

    The attention is the last decoder layer's cross-attention of every query over the
    encoder's feature map (h, w), averaged over heads, rows summing to 1.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep_features(module, inputs, output):
        features = output[0][-1]
        captured["hw"] = (features.tensors if hasattr(features, "tensors") else features).shape[-2:]

    hooks = [model.backbone.register_forward_hook(keep_features)]
    try:
        with torch.no_grad(), cross_attention_weights(model) as weights:
            outputs = model([image])
    finally:
        for hook in hooks:
            hook.remove()
    h, w = captured["hw"]
    return outputs, weights()[0].reshape(-1, h, w)


def _heat(attention: torch.Tensor, size_wh: tuple[int, int]) -> np.ndarray:
    """[h, w] attention -> [H, W, 3] uint8 heat map at `size_wh`, scaled to its own maximum."""
    up = F.interpolate(attention[None, None].float(), size=(size_wh[1], size_wh[0]), mode="bilinear",
                       align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min()).clamp(min=1e-12)
    return (colormaps["inferno"](up.numpy())[..., :3] * 255).astype(np.uint8)


def render(picture: PIL.Image.Image, boxes_xyxy: torch.Tensor, labels: list[str], category_ids: list[int],
           attention: torch.Tensor, max_side: int, scores: list[float] | None = None) -> PIL.Image.Image:
    """The row of panels described in the module doc; `boxes_xyxy` in `picture`'s pixels; with
    `scores`, the first panel draws the highest-scoring box and label on top."""
    scale = min(1.0, max_side / max(picture.size))
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    base = picture.resize(size, PIL.Image.BILINEAR)
    boxes = boxes_xyxy * scale
    panels = [draw_detections(base, boxes, labels, category_ids, scores=scores)]
    for index in range(len(labels)):
        heat = PIL.Image.fromarray(_heat(attention[index], size))
        blended = PIL.Image.blend(base, heat, 0.6)
        panels.append(draw_detections(blended, boxes[index:index + 1], labels[index:index + 1],
                                      category_ids[index:index + 1]))
    row = PIL.Image.new("RGB", (size[0] * len(panels), size[1]))
    for index, panel in enumerate(panels):
        row.paste(panel, (index * size[0], 0))
    return row


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parse_flags(parser, argv)
    if not args.resume:
        parser.error("--resume CKPT is required: the checkpoint (path or URL) to look into")
    try:
        checkpoint = load_checkpoint(args.resume, map_location="cpu")
    except CheckpointError as err:
        raise SystemExit(f"visualize_attention.py: {err}") from err
    args = apply_checkpoint_args(args, get_args_parser, argv, checkpoint)
    device = resolve_device(args.device)
    args.device = str(device)
    model, _, _ = build_model(args)
    try:
        load_model_state(model, checkpoint["model"], what=str(args.resume))
    except CheckpointError as err:
        raise SystemExit(f"visualize_attention.py: {err}") from err
    model = model.detr if hasattr(model, "detr") else model  # a mask model's box part holds the decoder
    model.to(device).eval()

    picture = load_rgb(Path(args.image))
    if picture is None:
        raise SystemExit(f"--image {args.image}: not a readable picture")
    image, _ = make_detr_transforms("val", getattr(args, "image_scale", 1.0))(picture, None)
    outputs, attention = attention_maps(model, image.to(device))
    names = category_names(args, checkpoint)
    sizes = torch.tensor([[picture.height, picture.width]], dtype=torch.float32, device=device)
    found = detections(outputs, sizes, sorted(names) if names else None, threshold=-1.0)[0]
    order = found["scores"].argsort(descending=True)
    above = order[found["scores"][order] > args.threshold][: max(1, args.top_k)]
    chosen = above if len(above) else order[:1]
    if not len(above):
        print(f"no detection above --threshold {args.threshold}; showing the best one")
    ids, scores = found["labels"][chosen].tolist(), found["scores"][chosen].tolist()
    labels = [f"{names.get(i, str(i))} {s:.2f}" for i, s in zip(ids, scores)]
    row = render(picture, found["boxes"][chosen].cpu(), labels, ids,
                 attention[found["queries"][chosen]].cpu(), args.max_side, scores=scores)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    row.save(out)
    print(f"wrote {out} ({len(labels)} detection(s))")
    return out


if __name__ == "__main__":
    with exit_on_user_error():
        main()
