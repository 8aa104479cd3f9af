"""State-dict layouts equal the released architectures' (tests/data/state_dict/*.tsv); checkpoints with args load."""
import argparse
from pathlib import Path

import pytest
import torch

import hubconf
from util.checkpoint import load_checkpoint, load_model_state

# The released layouts (key, shape, dtype of every tensor in the original repository's
# checkpoints detr-r50-e632da11.pth, detr-r101-2c7b67e5.pth, detr-r50-panoptic-00ce5173.pth).
SPEC = Path(__file__).resolve().parent / "data" / "state_dict"


def _layout(path: Path) -> list[tuple[str, list[int], str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, [int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype.strip()))
    return rows


def _model_layout(model: torch.nn.Module) -> list[tuple[str, list[int], str]]:
    return [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("entry, tsv", [("detr_resnet50", "detr_resnet50.tsv"),
                                        ("detr_resnet101", "detr_resnet101.tsv"),
                                        ("detr_resnet50_panoptic", "detr_resnet50_panoptic.tsv"),
                                        ("detr_resnet50_dc5", "detr_resnet50.tsv")])
def test_layout_equals_release(entry, tsv):
    model = getattr(hubconf, entry)(pretrained=False)
    expected = _layout(SPEC / tsv)
    actual = _model_layout(model)
    assert dict((k, (s, d)) for k, s, d in actual) == dict((k, (s, d)) for k, s, d in expected)
    assert [k for k, _, _ in actual] == [k for k, _, _ in expected]  # same order too


def test_checkpoint_with_args_and_bn_counters_loads_strictly(tmp_path):
    torch.manual_seed(0)
    source = hubconf.detr_resnet50(pretrained=False)
    state = source.state_dict()
    # Checkpoints made with torchvision's BatchNorm carry num_batches_tracked; frozen BN ignores it.
    state["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "args": argparse.Namespace(backbone="resnet50", lr=1e-4), "epoch": 3}, path)
    checkpoint = load_checkpoint(path)  # weights_only=True with Namespace allowed
    assert checkpoint["args"].backbone == "resnet50"
    target = hubconf.detr_resnet50(pretrained=False)
    load_model_state(target, checkpoint["model"])
    target.load_state_dict(checkpoint["model"], strict=True)
    assert torch.equal(target.class_embed.weight, source.class_embed.weight)
    assert torch.equal(target.backbone[0].body.layer4[2].bn3.running_var, source.backbone[0].body.layer4[2].bn3.running_var)

