"""Export DETR for deployment: TorchScript (any model) or ONNX (detection models).

    python tools/export.py --resume detr-r50-e632da11.pth --format onnx --out detr.onnx
    python tools/export.py --resume detr-r50-panoptic-00ce5173.pth --format torchscript --out detr.pt

Model-shape flags come from the checkpoint as in predict.py (util/model_flags.py; explicit flags win).

ONNX input `images` [1, 3, H, W] (normalised as in training, H and W free), outputs
`pred_logits` [1, Q, C+1] and `pred_boxes` [1, Q, 4] (normalised cxcywh).
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from util.checkpoint import load_checkpoint, load_model_state  # noqa: E402
from util.cli import HelpFormatter, exit_on_user_error  # noqa: E402
from util.flag_types import parse_flags  # noqa: E402
from util.model_flags import add_model_flags, apply_checkpoint_args  # noqa: E402
from util.nested_tensor import nested_tensor_from_tensor_list  # noqa: E402


class ImageListModel(nn.Module):
    """Wraps DETR / DETRsegm to take a list of [3, H_i, W_i] images (scriptable)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: List[Tensor]) -> Dict[str, Tensor]:
        return self.model(nested_tensor_from_tensor_list(images))


def export_torchscript(model: nn.Module, path: str) -> torch.jit.ScriptModule:
    """torch.jit.script the model (eval mode, aux_loss off) and save it to `path`."""
    model.eval()
    scripted = torch.jit.script(model)
    scripted.save(path)
    return scripted


def export_onnx(model: nn.Module, path: str, height: int = 800, width: int = 1066, max_side: int = 4096) -> None:
    """ONNX export of a detection DETR on [1, 3, H, W] images, H and W dynamic (multiples of 1 up to max_side)."""
    model.eval()
    example = torch.randn(1, 3, height, width)
    h = torch.export.Dim("height", min=32, max=max_side)
    w = torch.export.Dim("width", min=32, max=max_side)
    torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["pred_logits", "pred_boxes"],
                      dynamo=True, dynamic_shapes={"samples": {2: h, 3: w}})


def get_args_parser() -> argparse.ArgumentParser:
    """The export flags plus the model-shape flags (which default to the checkpoint's)."""
    parser = argparse.ArgumentParser(usage="%(prog)s --resume CKPT --out FILE [options]", description="DETR export",
                                     formatter_class=HelpFormatter)
    export = parser.add_argument_group("export")
    export.add_argument("--resume", default="", help="checkpoint path or https/file URL of the trained model")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx",
                        help="onnx: detection models, free image size; torchscript: any model")
    export.add_argument("--out", required=True, help="output file (.onnx or .pt)")
    add_model_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parse_flags(parser, argv)
    if not args.resume:
        parser.error("--resume CKPT is required: the checkpoint (path or URL) to export")
    checkpoint = load_checkpoint(args.resume)
    args = apply_checkpoint_args(args, get_args_parser, argv, checkpoint)
    # A model trained with --backbone_weights none has trainable BatchNorm; build it the same way.
    if getattr(checkpoint.get("args"), "backbone_weights", None) == "none":
        args.backbone_weights = "none"
    args.aux_loss = False
    args.device = "cpu"
    model, _, _ = build_model(args)
    load_model_state(model, checkpoint["model"])
    if args.format == "onnx":
        if args.masks:
            raise SystemExit("export.py: ONNX export covers detection models; use --format torchscript with --masks")
        export_onnx(model, args.out)
    else:
        export_torchscript(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
