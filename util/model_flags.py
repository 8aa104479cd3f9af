"""The flags `models.build_model` reads, shared by main.py, predict.py and tools/, and how a script
that loads a checkpoint takes them from it (its weights' shapes, then its saved args).

`add_model_flags`: the architecture (original groups "model", "model: backbone", "model: transformer",
"model: segmentation"); `add_criterion_flags`: the loss and matching weights ("loss", "matcher",
"loss coefficients"), which build_model also reads though only training uses them.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from util.flag_types import non_negative_float, non_negative_int, positive_int, probability


def add_model_flags(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """The architecture flags in the original's groups; returns the groups by title, so a script can
    add its own flags beside them (main.py: --frozen_weights, --backbone_weights)."""
    model = parser.add_argument_group("model")
    model.add_argument("--num_classes", default=None, type=positive_int,
                       help="classes (max category id + 1); inferred from the dataset or checkpoint when not given")

    backbone = parser.add_argument_group("model: backbone")
    backbone.add_argument("--backbone", default="resnet50", type=str, help="torchvision ResNet name")
    backbone.add_argument("--dilation", action="store_true",
                          help="replace stride by dilation in the last block (DC5)")
    backbone.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"),
                          help="positional encoding of the image features")

    transformer = parser.add_argument_group("model: transformer")
    transformer.add_argument("--enc_layers", default=6, type=non_negative_int, help="encoder layers")
    transformer.add_argument("--dec_layers", default=6, type=positive_int, help="decoder layers")
    transformer.add_argument("--dim_feedforward", default=2048, type=positive_int,
                             help="width of the feed-forward blocks")
    transformer.add_argument("--hidden_dim", default=256, type=positive_int,
                             help="transformer width (embedding size)")
    transformer.add_argument("--dropout", default=0.1, type=probability, help="dropout inside the transformer")
    transformer.add_argument("--nheads", default=8, type=positive_int, help="attention heads")
    transformer.add_argument("--num_queries", default=100, type=positive_int,
                             help="object queries (most boxes per image)")
    transformer.add_argument("--pre_norm", action="store_true", help="LayerNorm before attention/FFN, not after")

    segm = parser.add_argument_group("model: segmentation")
    segm.add_argument("--masks", action="store_true", help="train the segmentation head")
    return {group.title: group for group in (model, backbone, transformer, segm)}


def add_criterion_flags(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """The loss and Hungarian-matching flags, in the original's groups; returns the groups by title."""
    loss = parser.add_argument_group("loss")
    loss.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                      help="disable the auxiliary decoding losses (one per decoder layer)")
    loss.add_argument("--mask_loss_on_padding", action="store_true",
                      help="count padded pixels in the mask losses (the original's behaviour)")

    matcher = parser.add_argument_group("matcher (Hungarian matching costs)")
    matcher.add_argument("--set_cost_class", default=1, type=non_negative_float, help="weight of the class cost")
    matcher.add_argument("--set_cost_bbox", default=5, type=non_negative_float, help="weight of the L1 box cost")
    matcher.add_argument("--set_cost_giou", default=2, type=non_negative_float,
                         help="weight of the generalized IoU cost")

    coefs = parser.add_argument_group("loss coefficients")
    coefs.add_argument("--mask_loss_coef", default=1, type=non_negative_float, help="weight of the focal mask loss")
    coefs.add_argument("--dice_loss_coef", default=1, type=non_negative_float, help="weight of the dice mask loss")
    coefs.add_argument("--bbox_loss_coef", default=5, type=non_negative_float, help="weight of the L1 box loss")
    coefs.add_argument("--giou_loss_coef", default=2, type=non_negative_float,
                       help="weight of the generalized IoU loss")
    coefs.add_argument("--eos_coef", default=0.1, type=non_negative_float,
                       help="relative weight of the no-object class")
    return {group.title: group for group in (loss, matcher, coefs)}


def check_model_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations the transformer cannot be built with (one line naming the flags)."""
    if args.hidden_dim % args.nheads:
        raise ValueError(f"--hidden_dim {args.hidden_dim} is not a multiple of --nheads {args.nheads}: "
                         "each head gets hidden_dim / nheads channels")
    if args.position_embedding == "sine" and args.hidden_dim % 2:
        raise ValueError(f"--hidden_dim {args.hidden_dim} is odd: the sine position embedding needs an even width")


def explicit_flags(make_parser: Callable[[], argparse.ArgumentParser], argv: list[str]) -> set[str]:
    """The dests `argv` sets itself (so checkpoint values must not replace them): `argv` parsed
    again by a fresh parser from `make_parser` whose defaults are all suppressed."""
    probe = make_parser()
    probe._defaults.clear()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(probe.parse_known_args(argv)[0]))


def shape_args_from_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Flags fixed by the weights themselves: class count, queries, width, layers, masks, backbone."""
    prefix = "detr." if any(k.startswith("detr.") for k in state_dict) else ""
    found: dict[str, Any] = {"masks": bool(prefix)}
    if f"{prefix}class_embed.weight" in state_dict:
        found["num_classes"] = state_dict[f"{prefix}class_embed.weight"].shape[0] - 1
    if f"{prefix}query_embed.weight" in state_dict:
        found["num_queries"], found["hidden_dim"] = state_dict[f"{prefix}query_embed.weight"].shape

    def count(pattern: str) -> int:
        return len({k[len(pattern):].split(".")[0] for k in state_dict if k.startswith(pattern)})

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
    resnet = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101",
              (True, 36): "resnet152"}.get((bottleneck, count(f"{body}layer3.")))
    if resnet:
        found["backbone"] = resnet
    return found


def apply_checkpoint_args(args: argparse.Namespace, make_parser: Callable[[], argparse.ArgumentParser],
                          argv: list[str], checkpoint: dict) -> argparse.Namespace:
    """Fill `args` (parsed from `argv` by `make_parser()`) for building the checkpoint's model.

    Each model flag not given in `argv`, and each setting the script has no flag for (dataset kind,
    image scale, loss weights, ...), comes from the checkpoint: its weights' shapes first, then its
    saved args, then build_model's flag defaults. The script's own flags (device, batch size,
    output, ...) are never taken from the checkpoint. The backbone is built without weights (the
    checkpoint has them) and untrained.
    """
    explicit = explicit_flags(make_parser, argv)
    own = {action.dest for action in make_parser()._actions} - _flag_dests(add_model_flags)
    saved = checkpoint.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    inferred = shape_args_from_state_dict(checkpoint["model"])
    for key, value in {**saved, **inferred}.items():
        if key not in explicit and key not in own:
            setattr(args, key, value)
    defaults = {**vars(_defaults_parser().parse_args([])), "lr_backbone": 0.0}
    for key, value in defaults.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    args.backbone_weights, args.frozen_weights = "checkpoint", None
    return args


def _flag_dests(*adders: Callable[[argparse.ArgumentParser], Any]) -> set[str]:
    parser = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(parser)
    return {action.dest for action in parser._actions}


def _defaults_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    add_model_flags(parser)
    add_criterion_flags(parser)
    return parser
