"""The inference fast path's own arithmetic and memory: Winograd F(m x m, 3 x 3) convolutions
(fast/winograd.py), the buffers kept from call to call (fast/scratch.py) and where
optimize_for_inference uses them (the stem, the Winograd temporaries, layer1's shortcut)."""
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import resnet18, resnet50
from torchvision.ops.misc import FrozenBatchNorm2d

from fast import fold_frozen_batchnorm, optimize_for_inference, to_channels_last
from fast.fused_layers import FusedResidualLayer, StemConv2d, fuse_residual_layers, fuse_stem
from fast.scratch import ALWAYS_MAPPED_BYTES, ScratchBuffers
from fast.winograd import WinogradConv2d, winograd_convolutions, winograd_matrices

CL = torch.channels_last


@pytest.mark.parametrize("m", [2, 4])
def test_matrices_compute_the_correlation(m):
    a_t, g, b_t = winograd_matrices(m)
    assert a_t.shape == (m, m + 2) and g.shape == (m + 2, 3) and b_t.shape == (m + 2, m + 2)
    assert torch.equal(b_t, torch.round(b_t * 64) / 64)  # exact in fp32
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        d = torch.randn(m + 2, dtype=torch.float64, generator=generator)
        w = torch.randn(3, dtype=torch.float64, generator=generator)
        expected = torch.stack([(d[i:i + 3] * w).sum() for i in range(m)])
        torch.testing.assert_close(a_t @ ((g @ w) * (b_t @ d)), expected, rtol=0, atol=1e-12)


def _conv(cin: int, cout: int, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(2.0)
        conv.bias.uniform_(-0.5, 0.5)
    return conv


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(1, 8, 12, 16), (2, 5, 13, 7), (1, 3, 1, 1), (3, 4, 9, 10)])
def test_winograd_conv_equals_the_direct_convolution(m, shape):
    conv = _conv(shape[1], 6)
    fast = WinogradConv2d.taking_over(conv, m)
    x = torch.randn(shape)
    reference = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    direct_error = (conv(x).double() - reference).abs().max().item()
    with torch.no_grad():
        for layout in (torch.contiguous_format, CL):
            for relu in (False, True):
                out = fast.winograd(x.contiguous(memory_format=layout), relu=relu)
                assert out.shape == reference.shape and out.is_contiguous(memory_format=CL)
                expected = reference.relu() if relu else reference
                # fp32 rounding of the transforms: a few times the direct convolution's error at most
                assert (out.double() - expected).abs().max().item() <= max(8 * direct_error, 1e-5)
        torch.testing.assert_close(fast(x), conv(x), rtol=1e-5, atol=1e-5)  # forward: Winograd, no ReLU


def test_winograd_conv_shares_the_parameters_and_keeps_the_state_dict():
    conv = _conv(4, 4)
    fast = WinogradConv2d.taking_over(conv)
    assert fast.weight is conv.weight and fast.bias is conv.bias
    assert list(fast.state_dict()) == ["weight", "bias"]  # the transformed weights are not saved
    assert fast.winograd_weight.shape == (36, 4, 4)
    for bad in (nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=2)):
        with pytest.raises(ValueError, match="stride 1, padding 1"):
            WinogradConv2d.taking_over(bad)


def test_winograd_conv_runs_the_ordinary_convolution_under_autograd():
    conv = _conv(4, 4)
    fast = WinogradConv2d.taking_over(copy.deepcopy(conv))
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    assert not fast.runs_winograd(x)  # grad enabled
    fast(x).square().sum().backward()
    expected_grad = torch.autograd.grad(conv(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected_grad)
    assert fast.weight.grad is not None


def test_winograd_with_scratch_reuses_its_buffers_and_gives_the_same_numbers():
    conv = _conv(8, 8)
    fast = WinogradConv2d.taking_over(conv)
    scratch = ScratchBuffers()
    small, large = torch.randn(1, 8, 10, 9), torch.randn(2, 8, 16, 12)
    with torch.inference_mode():
        first = fast.winograd(small, True, scratch)
        kept = first.data_ptr()
        torch.testing.assert_close(first, fast.winograd(small, True))
        first = first.clone()
        torch.testing.assert_close(fast.winograd(large, True, scratch), fast.winograd(large, True))
        again = fast.winograd(small, True, scratch)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        assert fast.winograd(small, True, scratch).data_ptr() == again.data_ptr()  # the same buffer
    assert kept != 0


def test_scratch_buffers_per_name_shape_thread_and_mode():
    scratch = ScratchBuffers()
    like = torch.zeros(1)
    a = scratch.get("a", (2, 3), like)
    assert scratch.get("a", (2, 3), like) is a
    assert scratch.get("b", (2, 3), like) is not a
    assert scratch.get("a", (3, 2), like) is not a  # another shape replaces it
    assert scratch.get("a", (1, 4, 2, 2), like, CL).is_contiguous(memory_format=CL)
    assert scratch.get("a", (2, 3), like.double()).dtype == torch.float64
    mine = scratch.get("t", (4,), like)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(scratch.get("t", (4,), like)))
    thread.start()
    thread.join()
    assert theirs[0] is not mine and scratch.get("t", (4,), like) is mine
    with torch.inference_mode():
        inference = scratch.get("i", (4,), like)
    assert inference.is_inference()
    outside = scratch.get("i", (4,), like)  # an inference tensor cannot be written outside inference mode
    assert not outside.is_inference()
    outside.add_(1)
    assert copy.deepcopy(scratch).get("t", (4,), like) is not mine
    scratch.clear()
    assert scratch.get("a", (2, 3), like) is not a


def _frozen(model: nn.Module) -> nn.Module:
    """Random non-trivial frozen norms (as pretrained weights have), eval mode."""
    torch.manual_seed(1)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features)
                frozen.weight.uniform_(0.5, 1.5)
                frozen.bias.uniform_(-0.2, 0.2)
                frozen.running_mean.uniform_(-0.5, 0.5)
                frozen.running_var.uniform_(0.5, 2.0)
                setattr(module, child_name, frozen)
    return model.eval()


def test_optimize_for_inference_makes_the_wide_3x3_convs_winograd():
    trunk = _frozen(resnet18(weights=None))
    fold_frozen_batchnorm(trunk)
    winograd_convolutions(trunk)
    converted = [name for name, m in trunk.named_modules() if isinstance(m, WinogradConv2d)]
    # BasicBlock: both 3x3 convs, but not the strided first one of layers 2-4, nor 64-channel layer1
    assert converted == ["layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2", "layer3.0.conv2", "layer3.1.conv1",
                         "layer3.1.conv2", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]


def test_fused_trunk_equals_the_plain_one_and_keeps_only_internal_buffers():
    """ResNet-50 stem + layers: Winograd convs, the stem into a kept buffer, layer1's shortcut into a
    kept buffer once it is as large as glibc always maps afresh; same numbers as the plain trunk."""
    plain = _frozen(resnet50(weights=None))
    plain.fc = nn.Identity()
    fast = copy.deepcopy(plain)
    fold_frozen_batchnorm(fast)
    winograd_convolutions(fast)
    fuse_stem(fast)
    fuse_residual_layers(fast)
    to_channels_last(fast)
    assert type(fast.conv1) is StemConv2d and isinstance(fast.relu, nn.Identity)
    assert all(type(getattr(fast, f"layer{i}")) is FusedResidualLayer for i in range(1, 5))
    assert sum(isinstance(m, WinogradConv2d) for m in fast.modules()) == 3 + 5 + 2
    # layer1's 256-channel output is as large as glibc always maps: 4 * 256 * 100 * 90 * 4 bytes
    x = torch.randn(4, 3, 400, 360)
    assert 4 * 256 * 100 * 90 * 4 >= ALWAYS_MAPPED_BYTES
    trunk = lambda model, images: model.layer4(model.layer3(model.layer2(model.layer1(
        model.maxpool(model.relu(model.bn1(model.conv1(images))))))))
    with torch.no_grad():
        reference = trunk(plain, x)
    tolerance = 1e-4 * reference.abs().max().item()
    with torch.inference_mode():
        cl = x.contiguous(memory_format=CL)
        first = trunk(fast, cl).clone()
        torch.testing.assert_close(first, reference, rtol=0, atol=tolerance)
        stem = fast.conv1(cl)
        assert fast.conv1(cl).data_ptr() == stem.data_ptr()  # the stem writes into its kept buffer
        torch.testing.assert_close(stem, F.relu(F.conv2d(cl, fast.conv1.weight, fast.conv1.bias, 2, 3)))
        layer1 = fast.layer1(fast.maxpool(stem))
        assert fast.layer1(fast.maxpool(stem)).data_ptr() == layer1.data_ptr()  # the shortcut's kept buffer
        torch.testing.assert_close(trunk(fast, cl), first, rtol=0, atol=0)  # reuse changes nothing
        small = torch.randn(1, 3, 64, 96).contiguous(memory_format=CL)
        assert fast.layer1(fast.maxpool(fast.conv1(small))).data_ptr() != layer1.data_ptr()  # small: fresh
    with torch.no_grad():  # outside inference mode too, after buffers were made inside it
        torch.testing.assert_close(trunk(fast, cl), first, rtol=1e-6, atol=1e-6)
    grad_input = x.clone().requires_grad_()
    out = fast.layer1(fast.maxpool(fast.conv1(grad_input)))  # autograd: no kept buffers, a gradient
    out.sum().backward()
    assert grad_input.grad is not None and grad_input.grad.abs().sum() > 0


def test_optimize_for_inference_without_winograd_opt_out():
    trunk_model = _frozen(resnet18(weights=None))
    fast = optimize_for_inference(copy.deepcopy(trunk_model), winograd=False)
    assert not any(isinstance(m, WinogradConv2d) for m in fast.modules())
    assert type(fast.conv1) is StemConv2d
