"""hub entries build offline; pretrained weights come through a hash-checked URL (served here as file://)."""
import argparse
import hashlib
import shutil

import pytest
import torch

import hubconf
from models.detr import DETR, PostProcess
from models.segmentation import DETRsegm, PostProcessPanoptic
from util.checkpoint import CheckpointError

ENTRIES = ["detr_resnet50", "detr_resnet50_dc5", "detr_resnet101", "detr_resnet101_dc5", "detr_resnet50_panoptic",
           "detr_resnet50_dc5_panoptic", "detr_resnet101_panoptic"]


def test_entries_and_release_names():
    assert hubconf.dependencies == ["torch", "torchvision"]
    assert sorted(hubconf.CHECKPOINTS) == sorted(ENTRIES)
    assert all(callable(getattr(hubconf, name)) for name in ENTRIES)
    assert hubconf.RELEASE_URL == "https://dl.fbaipublicfiles.com/detr/"
    assert hubconf.CHECKPOINTS["detr_resnet50"] == "detr-r50-e632da11.pth"


def test_torch_hub_load_local_builds_offline(repo_root):
    model, post = torch.hub.load(str(repo_root), "detr_resnet50", source="local", pretrained=False,
                                 return_postprocessor=True)
    assert isinstance(model, DETR) and isinstance(post, PostProcess)
    assert model.class_embed.out_features == 92 and model.query_embed.num_embeddings == 100
    model, post = hubconf.detr_resnet50_panoptic(pretrained=False, threshold=0.7, return_postprocessor=True)
    assert isinstance(model, DETRsegm) and isinstance(post, PostProcessPanoptic) and post.threshold == 0.7
    assert model.detr.class_embed.out_features == 251


def _serve(tmp_path, monkeypatch, name: str, payload: dict) -> None:
    """Save `payload`, name it `name` (an 8-hex placeholder replaced by the real sha256 prefix when name has
    'HASH'), and point hubconf at a file:// release folder."""
    serve = tmp_path / "release"
    serve.mkdir()
    raw = tmp_path / "raw.pth"
    torch.save(payload, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
    file_name = name.replace("HASH", digest)
    shutil.copy(raw, serve / file_name)
    monkeypatch.setattr(hubconf, "RELEASE_URL", serve.as_uri() + "/")
    monkeypatch.setitem(hubconf.CHECKPOINTS, "detr_resnet50", file_name)


def test_pretrained_loads_through_hash_checked_url(tmp_path, monkeypatch):
    torch.manual_seed(3)
    source = hubconf.detr_resnet50(pretrained=False)
    _serve(tmp_path, monkeypatch, "detr-r50-HASH.pth",
           {"model": source.state_dict(), "args": argparse.Namespace(backbone="resnet50")})
    model = hubconf.detr_resnet50(pretrained=True)
    assert torch.equal(model.query_embed.weight, source.query_embed.weight)
    assert torch.equal(model.backbone[0].body.conv1.weight, source.backbone[0].body.conv1.weight)


def test_wrong_hash_prefix_is_refused(tmp_path, monkeypatch):
    source = hubconf.detr_resnet50(pretrained=False)
    _serve(tmp_path, monkeypatch, "detr-r50-00000000.pth", {"model": source.state_dict()})
    with pytest.raises(CheckpointError, match=r"detr-r50-00000000\.pth does not match the sha256 prefix"):
        hubconf.detr_resnet50(pretrained=True)
