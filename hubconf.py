"""torch.hub entries: the seven released DETR models, optionally with their COCO weights.

    model = torch.hub.load("facebookresearch/detr", "detr_resnet50", pretrained=True)
    model = torch.hub.load("/path/to/this/repo", "detr_resnet50", source="local", pretrained=False)

Weights come from RELEASE_URL; each file name carries the first 8 hex digits of its SHA-256,
checked on download, and files are read with weights_only=True (the checkpoint's `args`
argparse.Namespace allowed), so a replaced file cannot run code. Building never needs the
ImageNet backbone weights: the released checkpoints hold the whole model.
"""
import torch

from models.backbone import Backbone, Joiner
from models.detr import DETR, PostProcess
from models.position_encoding import PositionEmbeddingSine
from models.segmentation import DETRsegm, PostProcessPanoptic
from models.transformer import Transformer
from util.checkpoint import load_checkpoint, load_model_state

dependencies = ["torch", "torchvision"]

RELEASE_URL = "https://dl.fbaipublicfiles.com/detr/"
CHECKPOINTS = {
    "detr_resnet50": "detr-r50-e632da11.pth",
    "detr_resnet50_dc5": "detr-r50-dc5-f0fb7ef5.pth",
    "detr_resnet101": "detr-r101-2c7b67e5.pth",
    "detr_resnet101_dc5": "detr-r101-dc5-a2e86def.pth",
    "detr_resnet50_panoptic": "detr-r50-panoptic-00ce5173.pth",
    "detr_resnet50_dc5_panoptic": "detr-r50-dc5-panoptic-da08f1b1.pth",
    "detr_resnet101_panoptic": "detr-r101-panoptic-40021d53.pth",
}


def _make_detr(backbone_name: str, dilation: bool = False, num_classes: int = 91, mask: bool = False):
    """The released architecture: hidden 256, 8 heads, 6+6 layers, FFN 2048, 100 queries, no aux loss."""
    hidden_dim = 256
    backbone = Backbone(backbone_name, train_backbone=True, return_interm_layers=mask, dilation=dilation)
    joiner = Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2, normalize=True))
    transformer = Transformer(d_model=hidden_dim, return_intermediate_dec=True)
    detr = DETR(joiner, transformer, num_classes=num_classes, num_queries=100)
    return DETRsegm(detr) if mask else detr


def _load_release(model: torch.nn.Module, entry: str) -> None:
    """Download (once, into torch.hub.get_dir()) and load the released weights of `entry`."""
    url = RELEASE_URL + CHECKPOINTS[entry]
    # load_checkpoint: weights_only with the allow-list, sha256-prefix check, errors that say what to do
    checkpoint = load_checkpoint(url)
    state_dict = checkpoint["model"] if "model" in checkpoint else checkpoint
    load_model_state(model, state_dict, f"released checkpoint {url}")


def _detection(entry: str, backbone: str, dilation: bool, pretrained: bool, num_classes: int,
               return_postprocessor: bool):
    model = _make_detr(backbone, dilation=dilation, num_classes=num_classes)
    if pretrained:
        _load_release(model, entry)
    return (model, PostProcess()) if return_postprocessor else model


def _panoptic(entry: str, backbone: str, dilation: bool, pretrained: bool, num_classes: int, threshold: float,
              return_postprocessor: bool):
    model = _make_detr(backbone, dilation=dilation, num_classes=num_classes, mask=True)
    if pretrained:
        _load_release(model, entry)
    if return_postprocessor:
        is_thing_map = {i: i <= 90 for i in range(num_classes)}  # COCO panoptic: ids <= 90 are things
        return model, PostProcessPanoptic(is_thing_map, threshold=threshold)
    return model


def detr_resnet50(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR R50 (42.0 box AP on COCO val2017)."""
    return _detection("detr_resnet50", "resnet50", False, pretrained, num_classes, return_postprocessor)


def detr_resnet50_dc5(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR-DC5 R50: dilated last stage, stride 16 (43.3 AP)."""
    return _detection("detr_resnet50_dc5", "resnet50", True, pretrained, num_classes, return_postprocessor)


def detr_resnet101(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR R101 (43.5 AP)."""
    return _detection("detr_resnet101", "resnet101", False, pretrained, num_classes, return_postprocessor)


def detr_resnet101_dc5(pretrained=False, num_classes=91, return_postprocessor=False):
    """DETR-DC5 R101 (44.9 AP)."""
    return _detection("detr_resnet101_dc5", "resnet101", True, pretrained, num_classes, return_postprocessor)


def detr_resnet50_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False):
    """DETR R50 panoptic (43.4 PQ); the post-processor returns PNG + segments_info per image."""
    return _panoptic("detr_resnet50_panoptic", "resnet50", False, pretrained, num_classes, threshold,
                     return_postprocessor)


def detr_resnet50_dc5_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False):
    """DETR-DC5 R50 panoptic (44.6 PQ)."""
    return _panoptic("detr_resnet50_dc5_panoptic", "resnet50", True, pretrained, num_classes, threshold,
                     return_postprocessor)


def detr_resnet101_panoptic(pretrained=False, num_classes=250, threshold=0.85, return_postprocessor=False):
    """DETR R101 panoptic (45.1 PQ)."""
    return _panoptic("detr_resnet101_panoptic", "resnet101", False, pretrained, num_classes, threshold,
                     return_postprocessor)
