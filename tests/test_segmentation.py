"""DETRsegm outputs, frozen box model, attention maps, and PostProcessSegm against the batch-wide recipe."""
import pytest
import torch
import torch.nn.functional as F

from models.backbone import Backbone, Joiner
from models.detr import DETR
from models.position_encoding import PositionEmbeddingSine
from models.segmentation import DETRsegm, MHAttentionMap, PostProcessSegm
from models.transformer import Transformer


def _segm(freeze: bool = False) -> DETRsegm:
    torch.manual_seed(0)
    joiner = Joiner(Backbone("resnet18", True, True, False), PositionEmbeddingSine(64, normalize=True))
    transformer = Transformer(d_model=128, nhead=8, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                              return_intermediate_dec=True)
    return DETRsegm(DETR(joiner, transformer, num_classes=4, num_queries=3), freeze_detr=freeze)


def test_pred_masks_shape_and_frozen_box_model():
    model = _segm(freeze=True)
    out = model([torch.randn(3, 64, 96), torch.randn(3, 48, 64)])
    assert out["pred_masks"].shape == (2, 3, 16, 24)
    assert out["pred_logits"].shape == (2, 3, 5)
    assert not any(p.requires_grad for p in model.detr.parameters())
    assert all(p.requires_grad for p in model.mask_head.parameters())
    out["pred_masks"].sum().backward()
    assert model.mask_head.out_lay.weight.grad is not None and model.detr.class_embed.weight.grad is None


def test_attention_map_softmax_over_heads_and_pixels():
    torch.manual_seed(0)
    att = MHAttentionMap(16, 16, 4)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 4] = True
    w = att(torch.randn(2, 6, 16), torch.randn(2, 16, 3, 5), mask=mask)
    assert w.shape == (2, 6, 4, 3, 5)
    assert torch.allclose(w.flatten(2).sum(-1), torch.ones(2, 6))
    assert w[1, :, :, :, 4].abs().max() == 0


def _batch_reference(outputs, orig, processed, threshold=0.5):
    """The original's recipe: upsample the whole batch to the largest size, threshold, crop, resize."""
    max_h, max_w = processed.max(0)[0].tolist()
    masks = F.interpolate(outputs["pred_masks"], size=(max_h, max_w), mode="bilinear", align_corners=False)
    masks = (masks.sigmoid() > threshold).cpu()
    result = []
    for cur, t, tt in zip(masks, processed, orig):
        m = cur[:, : t[0], : t[1]].unsqueeze(1)
        result.append(F.interpolate(m.float(), size=tuple(tt.tolist()), mode="nearest").byte())
    return result


def test_postprocess_segm_equals_batch_recipe():
    torch.manual_seed(0)
    outputs = {"pred_masks": torch.randn(2, 7, 12, 16) * 3}
    processed = torch.tensor([[45, 64], [37, 50]])
    orig = torch.tensor([[90, 128], [30, 41]])
    results = PostProcessSegm(queries_per_chunk=3)([{}, {}], outputs, orig, processed)
    reference = _batch_reference(outputs, orig, processed)
    for got, want, size in zip(results, reference, orig.tolist()):
        assert got["masks"].dtype == torch.uint8 and got["masks"].shape == (7, 1, *size)
        assert torch.equal(got["masks"], want)
    with pytest.raises(ValueError, match="differ in length"):
        PostProcessSegm()([{}], outputs, orig[:1], processed)


def test_frozen_box_model_with_trainable_batchnorm_keeps_its_statistics():
    """A box model trained with plain BatchNorm (--backbone_weights none) must not drift in stage two."""
    torch.manual_seed(0)
    joiner = Joiner(Backbone("resnet18", True, True, False, trainable_norm=True), PositionEmbeddingSine(64, normalize=True))
    transformer = Transformer(d_model=128, nhead=8, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                              dropout=0.1, return_intermediate_dec=True)
    model = DETRsegm(DETR(joiner, transformer, num_classes=4, num_queries=3), freeze_detr=True)
    before = {k: v.clone() for k, v in model.detr.state_dict().items()}
    model.train()
    assert model.training and model.mask_head.training
    assert model.detr.transformer.encoder.layers[0].dropout.training  # dropout follows train(), as the original
    assert not model.detr.backbone[0].body.bn1.training
    model([torch.randn(3, 64, 96), torch.randn(3, 48, 64)])["pred_masks"].sum().backward()
    after = model.detr.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "running statistics of the frozen box model moved"
    unfrozen = DETRsegm(DETR(joiner, transformer, num_classes=4, num_queries=3), freeze_detr=False).train()
    assert unfrozen.detr.backbone[0].body.bn1.training
