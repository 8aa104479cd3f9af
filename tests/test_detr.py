"""DETR forward on every input form, PostProcess by hand, backbone freezing and weights, build_model."""
import argparse

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from models import build_model
from models.backbone import Backbone, Joiner, build_backbone, imagenet_weights_file
from models.detr import DETR, PostProcess
from models.position_encoding import PositionEmbeddingSine
from models.transformer import Transformer
from util.nested_tensor import nested_tensor_from_tensor_list


def tiny_args(**overrides) -> argparse.Namespace:
    args = dict(lr_backbone=1e-5, backbone="resnet18", dilation=False, position_embedding="sine", enc_layers=1,
                dec_layers=2, dim_feedforward=64, hidden_dim=32, dropout=0.1, nheads=2, num_queries=5, pre_norm=False,
                masks=False, aux_loss=True, set_cost_class=1, set_cost_bbox=5, set_cost_giou=2, mask_loss_coef=1,
                dice_loss_coef=1, bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1, dataset_file="coco",
                device="cpu", frozen_weights=None, backbone_weights="checkpoint", num_classes=None)
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    joiner = Joiner(Backbone("resnet18", True, False, False), PositionEmbeddingSine(16, normalize=True))
    transformer = Transformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
                              return_intermediate_dec=True)
    return DETR(joiner, transformer, num_classes=6, num_queries=5, aux_loss=True).eval()


def test_forward_accepts_nested_tensor_batch_tensor_and_list(model):
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 70)]
    with torch.no_grad():
        from_list = model(images)
        from_nested = model(nested_tensor_from_tensor_list(images))
        batch = torch.randn(2, 3, 64, 64)
        from_tensor = model(batch)
        from_equal_list = model(list(batch))
    assert from_list["pred_logits"].shape == (2, 5, 7) and from_list["pred_boxes"].shape == (2, 5, 4)
    assert torch.equal(from_list["pred_boxes"], from_nested["pred_boxes"])
    assert torch.allclose(from_tensor["pred_logits"], from_equal_list["pred_logits"], atol=1e-6)
    assert from_list["pred_boxes"].min() >= 0 and from_list["pred_boxes"].max() <= 1
    assert len(from_list["aux_outputs"]) == 1 and from_list["aux_outputs"][0]["pred_boxes"].shape == (2, 5, 4)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 64, 64))


def test_postprocess_by_hand():
    logits = torch.log(torch.tensor([[[0.1, 0.6, 0.3], [0.2, 0.1, 0.7]]]))  # last column = no object
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0]]])
    (result,) = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert result["labels"].tolist() == [1, 0]
    assert result["scores"].tolist() == pytest.approx([0.6, 0.2], abs=1e-6)
    assert torch.allclose(result["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 100.0]]),
                          atol=1e-4)


@pytest.mark.parametrize("train_backbone", [True, False])
def test_only_layers_2_to_4_train(train_backbone):
    backbone = Backbone("resnet18", train_backbone, False, False)
    trainable = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == ({"layer2", "layer3", "layer4"} if train_backbone else set())
    assert not any("num_batches_tracked" in k for k in backbone.state_dict())
    assert isinstance(backbone.body.bn1, FrozenBatchNorm2d) and backbone.body.bn1.eps == 1e-5


@pytest.mark.parametrize("layers, expected", [
    (0, set()), (1, {"layer4"}), (3, {"layer2", "layer3", "layer4"}),
    (5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
])
def test_trainable_backbone_layers_count_from_the_top(layers, expected):
    # trainable norms, as with --backbone_weights none, so bn1 has parameters to train
    backbone = Backbone("resnet18", True, False, False, trainable_norm=True, trainable_layers=layers)
    assert {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad} == expected
    with pytest.raises(ValueError, match="must be 0..5, got 6"):
        Backbone("resnet18", True, False, False, trainable_layers=6)


def test_masks_and_dilation_outputs():
    nested = nested_tensor_from_tensor_list([torch.randn(3, 64, 64), torch.randn(3, 32, 48)])
    out = Backbone("resnet18", True, True, False)(nested)
    assert [tuple(v.tensors.shape[-2:]) for v in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert [v.tensors.shape[1] for v in out.values()] == [64, 128, 256, 512]
    assert out["2"].mask[1].tolist() == [[False] * 3 + [True]] * 2 + [[True] * 4] * 2  # nearest-resized padding
    with torch.no_grad():
        dc5 = Backbone("resnet50", True, False, True)(nested)
    assert list(dc5) == ["0"] and tuple(dc5["0"].tensors.shape[1:]) == (2048, 4, 4)  # stride 16
    with pytest.raises(ValueError, match="dilation"):
        Backbone("resnet18", True, False, True)


def test_backbone_weights_modes(tmp_path):
    missing = imagenet_weights_file("resnet18")
    assert missing.name == "resnet18-f37072fd.pth" and not missing.exists()
    with pytest.raises(FileNotFoundError) as info:
        build_backbone(tiny_args(backbone_weights="imagenet"))
    assert str(missing) in str(info.value) and "--backbone_weights none" in str(info.value)
    assert isinstance(build_backbone(tiny_args(backbone_weights="none"))[0].body.bn1, nn.BatchNorm2d)
    assert isinstance(build_backbone(tiny_args(backbone_weights="checkpoint"))[0].body.bn1, FrozenBatchNorm2d)
    # A state-dict file of the torchvision ResNet, with BatchNorm's num_batches_tracked, loads into frozen BN.
    import torchvision
    resnet = torchvision.models.resnet18()
    nn.init.constant_(resnet.layer1[0].conv1.weight, 0.25)
    resnet.bn1.running_mean.fill_(0.5)
    path = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), path)
    body = build_backbone(tiny_args(backbone_weights=str(path)))[0].body
    assert body.layer1[0].conv1.weight.unique().tolist() == [0.25] and body.bn1.running_mean[0] == 0.5
    missing.parent.mkdir(parents=True, exist_ok=True)
    torch.save(resnet.state_dict(), missing)
    body = build_backbone(tiny_args(backbone_weights="imagenet"))[0].body
    assert body.layer1[0].conv1.weight.unique().tolist() == [0.25]


def test_build_model_classes_postprocessors_and_weights():
    model, criterion, post = build_model(tiny_args())
    assert model.class_embed.out_features == 92 and set(post) == {"bbox"}
    assert criterion.weight_dict == {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2,
                                     "loss_ce_0": 1, "loss_bbox_0": 5, "loss_giou_0": 2}
    assert criterion.losses == ["labels", "boxes", "cardinality"] and criterion.mask_loss_on_padding is False
    model, criterion, post = build_model(tiny_args(dataset_file="coco_panoptic", masks=True, hidden_dim=128, nheads=8))
    assert model.detr.class_embed.out_features == 251 and set(post) == {"bbox", "segm", "panoptic"}
    assert post["panoptic"].is_thing_map[90] and not post["panoptic"].is_thing_map[91]
    assert "loss_mask" in criterion.weight_dict and "masks" in criterion.losses
    _, _, post = build_model(tiny_args(dataset_file="custom", num_classes=4, masks=True, hidden_dim=128,
                                       nheads=8, frozen_weights="x.pth", thing_ids=[1]))
    assert set(post) == {"bbox", "segm"}
    with pytest.raises(ValueError, match="num_classes"):
        build_model(tiny_args(dataset_file="custom"))
