"""Inference fast paths (frozen BN folded into convs, channels_last, SDPA attention) keep the outputs."""
import copy

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from models.backbone import Backbone, Joiner
from models.detr import DETR
from models.fuse import fold_frozen_batchnorm, to_channels_last
from models.position_encoding import PositionEmbeddingSine
from models.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    joiner = Joiner(Backbone("resnet18", True, False, False), PositionEmbeddingSine(16, normalize=True))
    transformer = Transformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                              return_intermediate_dec=True)
    detr = DETR(joiner, transformer, num_classes=4, num_queries=5).eval()
    # Non-trivial frozen statistics, as pretrained weights have; identity BN would hide folding errors.
    for module in detr.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return detr


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return [torch.randn(3, 64, 96), torch.randn(3, 80, 64)]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))


@pytest.mark.parametrize("fast", ["fold", "channels_last", "both"])
def test_fast_path_equals_plain(model, images, fast):
    fast_model = copy.deepcopy(model)
    if fast in ("fold", "both"):
        fast_model = fold_frozen_batchnorm(fast_model)
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast_model.modules())
    if fast in ("channels_last", "both"):
        fast_model = to_channels_last(fast_model)
        assert fast_model.backbone[0].body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain, quick = model(images), fast_model(images)
    assert _max_diff(plain, quick) < 1e-4


def test_eval_mode_batchnorm_of_a_from_scratch_backbone_is_folded_too(images):
    torch.manual_seed(0)
    joiner = Joiner(Backbone("resnet18", True, False, False, trainable_norm=True), PositionEmbeddingSine(16, normalize=True))
    transformer = Transformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64)
    detr = DETR(joiner, transformer, num_classes=4, num_queries=5)
    detr.train()
    with torch.no_grad():
        detr(images)  # running statistics of real activations
    training_copy = fold_frozen_batchnorm(copy.deepcopy(detr))  # still training: its BN must stay
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in training_copy.modules()) == 20
    detr.eval()
    fast = to_channels_last(fold_frozen_batchnorm(copy.deepcopy(detr)))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    with torch.no_grad():
        assert _max_diff(detr(images), fast(images)) < 1e-4


def test_attention_weights_only_when_asked(model):
    attention = model.transformer.decoder.layers[-1].multihead_attn
    q, kv = torch.randn(5, 2, 32), torch.randn(12, 2, 32)
    out_fast, none = attention(q, kv, kv)
    out_slow, weights = attention(q, kv, kv, need_weights=True)
    assert none is None and weights.shape == (2, 5, 12)
    assert (out_fast - out_slow).abs().max() < 1e-5
