"""--amp and --compile keep training/evaluation working and the outputs within tolerance.

bf16 autocast runs a real training step on CPU with the loss computed in fp32; fp16 on CPU is
refused with a clear message; a torch.compile'd model gives the eager outputs (slow: compiling
takes ~50 s on 2 CPU cores). On a CUDA machine the fp16 path (GradScaler) is exercised too.
"""
import pytest
import torch

import main
from engine import autocast_context, make_grad_scaler, train_one_epoch
from models import build_model
from util.nested_tensor import nested_tensor_from_tensor_list

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32", "--dim_feedforward", "64",
        "--nheads", "2", "--enc_layers", "1", "--dec_layers", "1", "--num_queries", "8", "--num_classes", "5",
        "--device", "cpu", "--print_freq", "0", "--dropout", "0"]


def _tiny(device="cpu"):
    args = main.get_args_parser().parse_args([*TINY, "--device", device])
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(args)
    return model.to(device), criterion.to(device)


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 112, 96, generator=g)]
    targets = tuple({"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]]),
                     "labels": torch.tensor([1, 3]), "image_id": torch.tensor([i])} for i in range(2))
    return nested_tensor_from_tensor_list(images), targets


class _Recording(torch.nn.Module):
    """Wraps a criterion and records the dtype of the logits it receives."""

    def __init__(self, criterion):
        super().__init__()
        self.inner, self.weight_dict, self.seen = criterion, criterion.weight_dict, []

    def forward(self, outputs, targets):
        self.seen.append(outputs["pred_logits"].dtype)
        return self.inner(outputs, targets)


def _step(model, criterion, amp, device, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4)
    return train_one_epoch(model, criterion, [_batch()], optimizer, device, epoch=0, max_norm=0.1,
                           amp=amp, scaler=make_grad_scaler(amp, device), print_freq=0)


def test_bf16_autocast_train_step_on_cpu():
    model, criterion = _tiny()
    raw = []
    model.class_embed.register_forward_hook(lambda m, i, o: raw.append(o.dtype))
    recording = _Recording(criterion)
    before = model.class_embed.weight.detach().clone()
    stats_bf16 = _step(model, recording, "bf16", "cpu")

    assert raw[0] == torch.bfloat16  # the forward really ran under autocast
    assert recording.seen == [torch.float32]  # ... and the loss saw fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, model.class_embed.weight)
    assert torch.isfinite(model.class_embed.weight).all()

    fresh, criterion = _tiny()
    stats_fp32 = _step(fresh, criterion, "off", "cpu")
    # same weights and batch: bf16 changes the loss only by rounding
    assert stats_bf16["loss"] == pytest.approx(stats_fp32["loss"], rel=0.05)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        autocast_context("fp16", "cpu")
    args = main.get_args_parser().parse_args([*TINY, "--amp", "fp16", "--dataset_file", "shapes"])
    with pytest.raises(ValueError, match="use --amp bf16 on CPU"):
        main.main(args)  # refused before any dataset or model is built


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_amp_train_step(amp):
    model, criterion = _tiny("cuda")
    stats = _step(model, criterion, amp, "cuda")
    fresh, criterion = _tiny("cuda")
    reference = _step(fresh, criterion, "off", "cuda")
    assert stats["loss"] == pytest.approx(reference["loss"], rel=0.05)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_compile_matches_eager():
    model, criterion = _tiny()
    samples, targets = _batch()
    model.eval()
    compiled = torch.compile(model)
    with torch.inference_mode():
        eager_out = model(samples)
        compiled_out = compiled(samples)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(compiled_out[key], eager_out[key], rtol=1e-4, atol=1e-4)

    # one training step each from the same weights: same loss, same updated weights
    eager_model, criterion = _tiny()
    eager_stats = _step(eager_model, criterion, "off", "cpu")
    compiled_model, criterion = _tiny()
    compiled_stats = _step(torch.compile(compiled_model), criterion, "off", "cpu")
    assert compiled_stats["loss"] == pytest.approx(eager_stats["loss"], rel=1e-4)
    torch.testing.assert_close(compiled_model.class_embed.weight, eager_model.class_embed.weight,
                               rtol=1e-4, atol=1e-5)
