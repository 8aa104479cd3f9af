"""The transformer with SDPA attention gives nn.MultiheadAttention's numbers, same state_dict."""
import copy

import pytest
import torch
from torch import nn

from models.attention import MultiheadAttention
from models.transformer import Transformer


def _with_torch_attention(model: nn.Module) -> nn.Module:
    """A copy whose attention modules are torch.nn.MultiheadAttention loaded with the same weights."""
    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MultiheadAttention):
                mha = nn.MultiheadAttention(child.embed_dim, child.num_heads, dropout=child.dropout)
                mha.load_state_dict(child.state_dict())
                setattr(parent, name, mha)
    return ref.eval()


def _inputs(b=2, d=32, h=3, w=5, q=4):
    torch.manual_seed(0)
    src, pos = torch.randn(b, d, h, w), torch.randn(b, d, h, w)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[1, :, 3:] = True  # second image is padded on the right
    mask[1, 2:, :] = True
    return src, mask, torch.randn(q, d), pos


def test_attention_matches_torch_with_padding_and_weights():
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 4)
    ref = nn.MultiheadAttention(16, 4)
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    q, k, v = torch.randn(3, 2, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    ref_out, ref_w = ref(q, k, v, key_padding_mask=pad)
    out, none = ours(q, k, v, key_padding_mask=pad)
    out_w, w = ours(q, k, v, key_padding_mask=pad, need_weights=True)
    assert none is None
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(out_w, ref_out, atol=1e-5)
    assert w.shape == (2, 3, 6) and torch.allclose(w, ref_w, atol=1e-6)
    assert w[1, :, 4:].abs().max() == 0


@pytest.mark.parametrize("normalize_before", [False, True])
def test_transformer_matches_torch_attention(normalize_before):
    model = Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=48,
                        dropout=0.1, normalize_before=normalize_before, return_intermediate_dec=True).eval()
    src, mask, query, pos = _inputs()
    with torch.no_grad():
        hs, memory = model(src, mask, query, pos)
        ref_hs, ref_memory = _with_torch_attention(model)(src, mask, query, pos)
    assert hs.shape == (3, 2, 4, 32) and memory.shape == (2, 32, 3, 5)
    assert (hs - ref_hs).abs().max() < 1e-4 and (memory - ref_memory).abs().max() < 1e-4
    assert (model.encoder.norm is not None) == normalize_before


def test_decoder_norm_applies_to_every_output():
    model = Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=48,
                        return_intermediate_dec=True).eval()
    src, mask, query, pos = _inputs()
    with torch.no_grad():
        hs, _ = model(src, mask, query, pos)
        model.decoder.return_intermediate = False
        last, _ = model(src, mask, query, pos)
    # Every intermediate output passed through the final LayerNorm (zero mean, unit variance).
    assert hs.mean(-1).abs().max() < 1e-5 and (hs.var(-1, unbiased=False) - 1).abs().max() < 1e-3
    assert last.shape == (1, 2, 4, 32) and torch.allclose(last[0], hs[-1], atol=1e-6)


def test_transformer_parameters_are_xavier_initialised():
    model = Transformer(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64)
    w = model.encoder.layers[0].linear1.weight  # xavier bound sqrt(6 / (64 + 64)) ~ 0.217; default init is 0.125
    assert w.abs().max() > 0.15 and w.abs().max() <= (6 / 128) ** 0.5 + 1e-6


def test_attention_masks_padded_keys_and_a_traced_graph_keeps_the_mask():
    """An all-false padding mask gives the unmasked result; padded keys are masked as
    nn.MultiheadAttention masks them, and a trace keeps the mask as an input."""
    torch.manual_seed(0)
    attention = MultiheadAttention(16, 2).eval()
    query, key = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    unpadded = torch.zeros(2, 7, dtype=torch.bool)
    padded = unpadded.clone()
    padded[1, 4:] = True
    with torch.no_grad():
        out, _ = attention(query, key, key, key_padding_mask=unpadded)
        assert torch.equal(out, attention(query, key, key)[0])
        reference = nn.MultiheadAttention(16, 2)
        reference.load_state_dict(attention.state_dict())
        reference.eval()
        torch.testing.assert_close(attention(query, key, key, key_padding_mask=padded)[0],
                                   reference(query, key, key, key_padding_mask=padded)[0], rtol=1e-5, atol=1e-6)
        traced = torch.jit.trace(_CrossAttention(attention), (query, key, unpadded))
        torch.testing.assert_close(traced(query, key, padded), attention(query, key, key, key_padding_mask=padded)[0])
        assert not torch.allclose(traced(query, key, padded), traced(query, key, unpadded))


class _CrossAttention(nn.Module):
    def __init__(self, attention: MultiheadAttention):
        super().__init__()
        self.attention = attention

    def forward(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attention(query, key, key, key_padding_mask=mask)[0]
