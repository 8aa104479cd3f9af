"""ResNet backbone with frozen BatchNorm, returning NestedTensors, and the Joiner that adds positions."""
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from models.position_encoding import build_position_encoding
from util.nested_tensor import NestedTensor

__all__ = ["FrozenBatchNorm2d", "BackboneBase", "Backbone", "Joiner", "build_backbone", "imagenet_weights_file"]


class BackboneBase(nn.Module):
    """Runs `backbone` up to layer4 (or layer1..4) and resizes the padding mask to each output."""

    def __init__(self, backbone: nn.Module, train_backbone: bool, num_channels: int, return_interm_layers: bool,
                 trainable_layers: int = 3):
        super().__init__()
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"--trainable_backbone_layers must be 0..5, got {trainable_layers}")
        # Counted from the top, as in torchvision's detection models: 3 (the original) trains
        # layer2..layer4 and leaves the stem and layer1 frozen; 5 trains everything.
        trained = ("layer4", "layer3", "layer2", "layer1", "conv1")[:trainable_layers]
        if trainable_layers == 5:
            trained += ("bn1",)
        for name, parameter in backbone.named_parameters():
            if not train_backbone or name.split(".")[0] not in trained:
                parameter.requires_grad_(False)
        if return_interm_layers:
            return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        else:
            return_layers = {"layer4": "0"}
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.num_channels = num_channels

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        xs = self.body(tensor_list.tensors)
        mask = tensor_list.mask
        assert mask is not None
        out: Dict[str, NestedTensor] = {}
        for name, x in xs.items():
            resized = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(x, resized)
        return out


def imagenet_weights_file(name: str) -> Path:
    """Where torchvision's IMAGENET1K_V1 file for ResNet `name` sits in the local torch hub cache."""
    enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name


def _load_resnet_weights(resnet: nn.Module, weights: Union[str, Path, dict], name: str) -> None:
    if isinstance(weights, (str, Path)):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file {path} does not exist")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
            state_dict = state_dict["model"]
    else:
        path, state_dict = None, weights
    missing, unexpected = resnet.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]  # the classifier is not used
    if missing or unexpected:
        raise ValueError(f"backbone weights {path or '(state dict)'} do not fit torchvision's {name}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


class Backbone(BackboneBase):
    """torchvision ResNet `name` with FrozenBatchNorm2d (or trainable BatchNorm2d with trainable_norm=True).

    `weights`: None (random initialisation), a path to a state-dict file or a state dict of the
    torchvision ResNet. Never downloads anything.
    """

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 weights: Optional[Union[str, Path, dict]] = None, trainable_norm: bool = False,
                 trainable_layers: int = 3):
        if not name.startswith("resnet") or not hasattr(torchvision.models, name):
            raise ValueError(f"--backbone {name!r} is not a torchvision ResNet (e.g. resnet50, resnet101)")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"--dilation needs a bottleneck ResNet (resnet50, resnet101); {name} cannot dilate")
        norm_layer = nn.BatchNorm2d if trainable_norm else FrozenBatchNorm2d
        resnet = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, False, dilation],
                                                   norm_layer=norm_layer)
        if weights is not None:
            _load_resnet_weights(resnet, weights, name)
        num_channels = 512 if name in ("resnet18", "resnet34") else 2048
        super().__init__(resnet, train_backbone, num_channels, return_interm_layers, trainable_layers)


class Joiner(nn.Sequential):
    """backbone then position encoding: NestedTensor -> (list of NestedTensor features, list of [B,d,H,W] pos)."""

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> Tuple[List[NestedTensor], List[torch.Tensor]]:
        xs = self[0](tensor_list)
        out: List[NestedTensor] = []
        pos: List[torch.Tensor] = []
        for x in xs.values():  # in layer order: layer1 (with masks) ... layer4
            out.append(x)
            pos.append(self[1](x).to(x.tensors.dtype))
        return out, pos


def _backbone_weights(args) -> Tuple[Optional[Union[str, Path]], bool]:
    """--backbone_weights -> (weights for Backbone, trainable_norm)."""
    choice = getattr(args, "backbone_weights", "imagenet")
    if choice in (None, "imagenet"):
        path = imagenet_weights_file(args.backbone)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet weights for {args.backbone} are not in the local torch cache: {path} is missing. "
                "Put torchvision's file there, or pass --backbone_weights none (random init, trainable "
                "BatchNorm) or --backbone_weights PATH to a state-dict file")
        return path, False
    if choice == "none":
        return None, True  # frozen statistics of random weights would normalise nothing
    if choice == "checkpoint":
        return None, False  # weights come from --resume / --frozen_weights
    return choice, False


def build_backbone(args) -> Joiner:
    """Backbone + position encoding from main.py's args (backbone, lr_backbone, masks, dilation, backbone_weights)."""
    weights, trainable_norm = _backbone_weights(args)
    backbone = Backbone(args.backbone, args.lr_backbone > 0, args.masks, args.dilation,
                        weights=weights, trainable_norm=trainable_norm,
                        trainable_layers=getattr(args, "trainable_backbone_layers", 3))
    return Joiner(backbone, build_position_encoding(args))
