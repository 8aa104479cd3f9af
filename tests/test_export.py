"""TorchScript (detection, panoptic, list-input wrapper) and ONNX export keep the outputs."""
import warnings

import onnxruntime
import torch

from models.backbone import Backbone, Joiner
from models.detr import DETR
from models.position_encoding import PositionEmbeddingSine
from models.segmentation import DETRsegm
from models.transformer import Transformer
from tools.export import ImageListModel, export_onnx
from util.nested_tensor import nested_tensor_from_tensor_list


def _detr(hidden: int = 32, heads: int = 2, masks: bool = False) -> DETR:
    torch.manual_seed(0)
    joiner = Joiner(Backbone("resnet18", True, masks, False), PositionEmbeddingSine(hidden // 2, normalize=True))
    transformer = Transformer(d_model=hidden, nhead=heads, num_encoder_layers=1, num_decoder_layers=2,
                              dim_feedforward=64, return_intermediate_dec=True)
    return DETR(joiner, transformer, num_classes=4, num_queries=3).eval()


def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the contract
        return torch.jit.script(model)


def test_torchscript_detection_panoptic_and_list_wrapper():
    images = [torch.randn(3, 64, 80), torch.randn(3, 48, 96)]
    nested = nested_tensor_from_tensor_list(images)
    detr = _detr()
    with torch.no_grad():
        eager, scripted = detr(nested), _script(detr)(nested)
        listed = _script(ImageListModel(detr))(images)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(eager[key], scripted[key]) and torch.equal(eager[key], listed[key])
    segm = DETRsegm(_detr(hidden=128, heads=8, masks=True)).eval()
    with torch.no_grad():
        eager, scripted = segm(nested), _script(segm)(nested)
    assert torch.equal(eager["pred_masks"], scripted["pred_masks"])
    assert torch.equal(eager["pred_boxes"], scripted["pred_boxes"])


def test_onnx_export_runs_in_onnxruntime_at_another_size(tmp_path):
    detr = _detr()
    path = tmp_path / "detr.onnx"
    export_onnx(detr, str(path), height=64, width=96)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]
    image = torch.randn(1, 3, 80, 128)  # not the export size
    logits, boxes = session.run(None, {"images": image.numpy()})
    with torch.no_grad():
        expected = detr(image)
    assert abs(logits - expected["pred_logits"].numpy()).max() < 1e-4
    assert abs(boxes - expected["pred_boxes"].numpy()).max() < 1e-4
