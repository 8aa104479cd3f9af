"""Fast paths keep the numbers: inference (frozen BN folded into convs, channels_last, the attention's
CPU shortcuts, fast.optimize_for_inference) within 1e-4 of the plain outputs; training
(fast.optimize_for_training) with the plain loss within 1e-5, the same gradients and the same
state_dict; the frozen stem gets no autograd work; models/ never imports fast/."""
import copy
import subprocess
import sys

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from fast import fold_frozen_batchnorm, optimize_for_inference, optimize_for_training, to_channels_last
from fast.attention import FastMultiheadAttention
from fast.dropout import SparseDropout
from fast.folding import FoldedFrozenBatchNorm2d, NormFoldedConv2d
from fast.fused_layers import FusedResidualLayer
from models.attention import MultiheadAttention
from models.backbone import Backbone, Joiner
from models.criterion import SetCriterion
from models.detr import DETR
from models.matcher import HungarianMatcher
from models.position_encoding import PositionEmbeddingSine
from models.transformer import Transformer


def _tiny_detr(aux_loss: bool = False) -> DETR:
    torch.manual_seed(0)
    joiner = Joiner(Backbone("resnet18", True, False, False), PositionEmbeddingSine(16, normalize=True))
    transformer = Transformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                              return_intermediate_dec=True)
    detr = DETR(joiner, transformer, num_classes=4, num_queries=5, aux_loss=aux_loss)
    # Non-trivial frozen statistics, as pretrained weights have; identity BN would hide folding errors.
    for module in detr.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return detr


@pytest.fixture(scope="module")
def model():
    return _tiny_detr().eval()


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


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace:FutureWarning")
def test_fast_attention_drops_an_all_false_mask_but_a_traced_graph_keeps_it(monkeypatch):
    """No key padded (batch of one, or of equal sizes): SDPA runs without a mask, bit-identical to the
    plain module's masked call. A trace must not freeze that decision into the graph."""
    torch.manual_seed(0)
    plain = MultiheadAttention(16, 2).eval()
    fast = copy.deepcopy(plain)
    fast.__class__ = FastMultiheadAttention
    query, key = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    unpadded = torch.zeros(2, 7, dtype=torch.bool)
    padded = unpadded.clone()
    padded[1, 4:] = True
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, attn_mask=None, **kwargs: masks.append(attn_mask) or sdpa(
                            *args, attn_mask=attn_mask, **kwargs))
    with torch.no_grad():
        assert torch.equal(fast(query, key, key, key_padding_mask=unpadded)[0],
                           plain(query, key, key, key_padding_mask=unpadded)[0])
        assert masks[0] is None and masks[1] is not None  # fast skipped the mask, plain did not
        assert torch.equal(fast(query, key, key, key_padding_mask=padded)[0],
                           plain(query, key, key, key_padding_mask=padded)[0])
        traced = torch.jit.trace(_CrossAttention(fast), (query, key, unpadded))
        torch.testing.assert_close(traced(query, key, padded), plain(query, key, key, key_padding_mask=padded)[0])
        assert not torch.allclose(traced(query, key, padded), traced(query, key, unpadded))


class _CrossAttention(torch.nn.Module):
    def __init__(self, attention: MultiheadAttention):
        super().__init__()
        self.attention = attention

    def forward(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attention(query, key, key, key_padding_mask=mask)[0]


def test_optimize_for_inference_swaps_in_the_fast_attention_without_sparse_dropout(model):
    fast = optimize_for_inference(copy.deepcopy(model))
    attentions = [m for m in fast.modules() if isinstance(m, MultiheadAttention)]
    assert len(attentions) == 3 and all(type(m) is FastMultiheadAttention and not m.sparse_dropout
                                        for m in attentions)


def test_models_never_import_fast(repo_root):
    """models/ is the paper only: importing every module of it loads nothing from fast/."""
    probe = ("import pkgutil, importlib, sys, models\n"
             "names = [m.name for m in pkgutil.iter_modules(models.__path__, 'models.')]\n"
             "[importlib.import_module(n) for n in names]\n"
             "print(len(names), sorted(m for m in sys.modules if m == 'fast' or m.startswith('fast.')))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=repo_root, capture_output=True, text=True, check=True)
    count, loaded = done.stdout.split(" ", 1)
    assert int(count) >= 8 and loaded.strip() == "[]", done.stdout


@pytest.mark.parametrize("batched", [False, True])
def test_optimize_for_inference_equals_plain(model, images, batched):
    fast = optimize_for_inference(copy.deepcopy(model).train())  # sets eval mode itself
    assert not fast.training
    inputs = torch.stack([images[0], images[0].flip(-1)]) if batched else images
    with torch.inference_mode():
        assert _max_diff(model(inputs), fast(inputs)) < 1e-4


@pytest.mark.parametrize("name, dilation", [("resnet18", False), ("resnet50", False), ("resnet50", True)])
def test_fused_residual_layers_give_the_plain_outputs_and_leave_inputs_alone(name, dilation):
    """optimize_for_inference runs each ResNet layer's convolutions with their ReLU and residual
    addition as single oneDNN calls, the sum written into the residual: same numbers, and the
    tensor a caller passes in is never overwritten (resnet18's layer1 has no downsample)."""
    torch.manual_seed(0)
    body = Backbone(name, False, False, dilation).body  # dilation: DC5's layer4
    for module in body.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    plain = copy.deepcopy(body).eval()
    fast = optimize_for_inference(copy.deepcopy(body))
    assert [n for n, m in fast.named_modules() if type(m) is FusedResidualLayer] == [
        "layer1", "layer2", "layer3", "layer4"]
    x = torch.randn(1, 3, 64, 80)
    with torch.inference_mode():
        reference, fused = plain(x)["0"], fast(x)["0"]
        for layer_name in ("layer1", "layer2"):
            layer = getattr(fast, layer_name)
            first_conv = layer[0].conv1
            given = torch.randn(1, first_conv.in_channels, 16, 20).contiguous(memory_format=torch.channels_last)
            kept = given.clone()
            layer(given)
            assert torch.equal(given, kept), layer_name
    # fp32 rounding relative to the activations' size (random resnet50 features reach ~70)
    tolerance = 1e-5 * reference.abs().max().item()
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=tolerance)
    unfused = fast(x)["0"]  # autograd on: the blocks' own forward, the same numbers
    torch.testing.assert_close(unfused, fused, rtol=1e-4, atol=tolerance)


# --- training -----------------------------------------------------------------------------------

def _criterion() -> SetCriterion:
    weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    weights.update({f"{k}_0": v for k, v in list(weights.items())})
    return SetCriterion(4, HungarianMatcher(1, 5, 2), weights, eos_coef=0.1, losses=["labels", "boxes", "cardinality"])


def _targets() -> list[dict]:
    return [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.5]])}]


def _loss(model, images, criterion) -> torch.Tensor:
    torch.manual_seed(3)  # the same dropout draws for both models
    losses = criterion(model(images), _targets())
    return sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)


def test_optimize_for_training_keeps_loss_gradients_and_state_dict(images):
    plain = _tiny_detr(aux_loss=True).train()
    fast = optimize_for_training(copy.deepcopy(plain), sparse_dropout=False)  # torch's dropout draws
    assert sum(isinstance(m, NormFoldedConv2d) for m in fast.modules()) == 20  # every resnet18 conv + norm pair
    assert sum(isinstance(m, FoldedFrozenBatchNorm2d) for m in fast.modules()) == 20
    assert list(fast.state_dict()) == list(plain.state_dict())
    # The frozen layer1 runs as one fused call per convolution (no graph to record); layer2 trains.
    body = fast.backbone[0].body
    assert all(type(getattr(body, f"layer{i}")) is FusedResidualLayer for i in range(1, 5))
    stem_out = torch.randn(2, 64, 16, 24).contiguous(memory_format=torch.channels_last)
    assert body.layer1.needs_no_autograd(stem_out) and not body.layer2.needs_no_autograd(stem_out)
    with torch.no_grad():
        torch.testing.assert_close(body.layer1(stem_out), torch.nn.Sequential.forward(body.layer1, stem_out),
                                   rtol=1e-5, atol=1e-5)
    criterion = _criterion()
    loss_plain, loss_fast = _loss(plain, images, criterion), _loss(fast, images, criterion)
    assert abs(loss_plain.item() - loss_fast.item()) < 1e-5
    loss_plain.backward()
    loss_fast.backward()
    fast_params = dict(fast.named_parameters())
    for name, p in plain.named_parameters():
        q = fast_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-6, msg=name)

    # One SGD step on each (Adam's first step would turn rounding-level gradients into full steps):
    # the state_dict of the fast model loads strictly into a plain model and equals the plain one's.
    for m in (plain, fast):
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1).step()
    reloaded = _tiny_detr(aux_loss=True)
    reloaded.load_state_dict(fast.state_dict(), strict=True)
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_optimize_for_training_draws_dropout_sparsely_and_otherwise_keeps_the_loss(images):
    """The default swaps every nn.Dropout for SparseDropout and makes attention drop its weights the
    same way: other draws, so with dropout on the loss differs; with p = 0 it equals the plain loss."""
    plain = _tiny_detr(aux_loss=True).train()
    fast = optimize_for_training(copy.deepcopy(plain))
    assert not any(type(m) is torch.nn.Dropout for m in fast.modules())
    assert sum(isinstance(m, SparseDropout) for m in fast.modules()) == 7  # 3 in the encoder layer, 4 in the decoder layer
    attentions = [m for m in fast.modules() if isinstance(m, MultiheadAttention)]
    assert len(attentions) == 3 and all(type(m) is FastMultiheadAttention and m.sparse_dropout for m in attentions)
    criterion = _criterion()
    assert abs(_loss(plain, images, criterion).item() - _loss(fast, images, criterion).item()) > 1e-6
    for model in (plain, fast):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            elif isinstance(module, MultiheadAttention):
                module.dropout = 0.0
    assert abs(_loss(plain, images, criterion).item() - _loss(fast, images, criterion).item()) < 1e-5


def test_strided_1x1_conv_takes_its_pixels_first_when_only_its_weights_need_gradients():
    """layer2's downsample (1x1, stride 2) reads the frozen layer1's output: NormFoldedConv2d picks
    every second pixel first and runs a stride-1 conv, same outputs and weight gradient."""
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), FrozenBatchNorm2d(16)
    norm.weight.uniform_(0.5, 2)
    norm.running_mean.uniform_(-1, 1)
    folded = NormFoldedConv2d.taking_over(copy.deepcopy(conv), FoldedFrozenBatchNorm2d.taking_over(norm))
    x = torch.randn(2, 8, 15, 22)
    assert folded._subsample_first(x) and not folded._subsample_first(x.clone().requires_grad_())
    out, reference = folded(x), norm(conv(x))
    assert out.shape == reference.shape == (2, 16, 8, 11)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(folded.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-5)


def test_optimize_for_training_reads_loaded_weights_and_survives_deepcopy(images):
    fast = optimize_for_training(_tiny_detr()).eval()
    plain = _tiny_detr().eval()
    for module in plain.modules():  # other frozen statistics than the fast model was built with
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.add_(0.3)
    fast.load_state_dict(plain.state_dict(), strict=True)
    copied = copy.deepcopy(fast)
    for module in copied.modules():  # changing the copy must leave the original alone
        if isinstance(module, FrozenBatchNorm2d):
            module.running_var.mul_(4)
    with torch.no_grad():
        assert _max_diff(plain(images), fast(images)) < 1e-4
        assert _max_diff(plain(images), copied(images)) > 1e-3
        # the inference fold composes with the training one
        assert _max_diff(plain(images), optimize_for_inference(copy.deepcopy(fast))(images)) < 1e-4


def test_frozen_stem_and_norms_get_no_autograd_work(images):
    """conv1 and layer1 have frozen weights and take the image (no grad): their outputs carry no
    graph, so backward never reaches them; every convolution backward belongs to a trainable conv."""
    for model in (_tiny_detr(aux_loss=True).train(), optimize_for_training(_tiny_detr(aux_loss=True).train())):
        body = model.backbone[0].body
        seen = {}
        for name in ("conv1", "bn1", "layer1", "layer2"):
            getattr(body, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: o.requires_grad}))
        loss = _loss(model, images, _criterion())
        assert seen == {"conv1": False, "bn1": False, "layer1": False, "layer2": True}
        nodes, stack = set(), [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in nodes:
                nodes.add(node)
                stack += [next_fn for next_fn, _ in node.next_functions]
        conv_backwards = sum(type(n).__name__ == "ConvolutionBackward0" for n in nodes)
        trainable_convs = sum(isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad for m in model.modules())
        assert conv_backwards == trainable_convs == 16  # layer2-4 (15) and input_proj


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_paths_on_cuda(images):
    """Both entry points on the GPU, TF32 off (cuDNN convolutions default to TF32, which alone moves
    the outputs by ~1e-3): the same tolerances as on the CPU."""
    cudnn_tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cuda_images = [image.cuda() for image in images]
        plain = _tiny_detr(aux_loss=True).cuda().eval()
        fast = optimize_for_inference(copy.deepcopy(plain))
        with torch.inference_mode():
            assert _max_diff(plain(cuda_images), fast(cuda_images)) < 1e-4
        plain.train()
        trained = optimize_for_training(copy.deepcopy(plain))
        criterion = _criterion().cuda()
        targets = [{k: v.cuda() for k, v in t.items()} for t in _targets()]
        losses = []
        for model in (plain, trained):
            torch.manual_seed(3)
            out = criterion(model(cuda_images), targets)
            losses.append(sum(out[k] * criterion.weight_dict[k] for k in out if k in criterion.weight_dict).item())
        assert abs(losses[0] - losses[1]) < 1e-5
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32
