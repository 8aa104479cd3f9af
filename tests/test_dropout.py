"""fast/dropout.py: the dropped positions have the Bernoulli(p) distribution F.dropout's mask has
(count, gaps, spread), kept elements are scaled by 1/(1-p), backward drops the same elements, and
the draws follow torch's seed; the attention dropout it replaces (fast/attention.py) averages to the
undropped output."""
import math

import pytest
import torch

import fast.dropout as dropout_module
from fast.attention import FastMultiheadAttention
from fast.dropout import SparseDropout, dropped_positions, sparse_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_positions_are_a_bernoulli_sample(p):
    n = 200_000
    generator = torch.Generator().manual_seed(0)
    positions = dropped_positions(n, p, generator)
    assert positions.dtype == torch.int64
    assert positions[0] >= 0 and positions[-1] < n
    assert bool((positions[1:] > positions[:-1]).all())  # sorted, no repeats
    sd = math.sqrt(n * p * (1 - p))
    assert abs(len(positions) - n * p) < 5 * sd
    # P(next element also dropped) = p: the gaps are geometric, not a fixed stride
    adjacent = (positions[1:] - positions[:-1] == 1).float().mean().item()
    assert abs(adjacent - p) < 5 * math.sqrt(p * (1 - p) / len(positions))
    # spread evenly: each tenth of the range holds a tenth of the drops
    per_tenth = torch.bincount(positions * 10 // n, minlength=10).float()
    assert (per_tenth - n * p / 10).abs().max().item() < 5 * math.sqrt(n / 10 * p * (1 - p))


def test_a_short_first_draw_draws_on(monkeypatch):
    monkeypatch.setattr(dropout_module, "SPARE_DEVIATIONS", -30.0)  # the first draw never reaches n
    n, p = 100_000, 0.2
    positions = dropped_positions(n, p, torch.Generator().manual_seed(1))
    assert bool((positions[1:] > positions[:-1]).all()) and positions[-1] < n
    assert abs(len(positions) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert positions[-1] > n - 50  # the tail is covered too


def test_bad_probability_is_refused():
    with pytest.raises(ValueError, match="p must be in"):
        dropped_positions(10, 1.0)


def test_forward_scales_kept_elements_and_backward_drops_the_same_ones():
    torch.manual_seed(0)
    x = torch.randn(64, 50, 40).transpose(0, 2).requires_grad_()  # not contiguous
    out = sparse_dropout(x, 0.25)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(out[kept], x.detach()[kept] / 0.75)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights * kept / 0.75)


def test_draws_follow_the_seed_and_differ_between_calls():
    x = torch.ones(1000)
    torch.manual_seed(5)
    first, second = sparse_dropout(x, 0.5), sparse_dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(sparse_dropout(x, 0.5), first)
    assert not torch.equal(first, second)


def test_identity_when_not_training_or_p_zero_and_the_module_form():
    x = torch.randn(100)
    assert sparse_dropout(x, 0.3, training=False) is x and sparse_dropout(x, 0.0) is x
    assert torch.equal(sparse_dropout(x, 1.0), torch.zeros(100))
    module = SparseDropout(0.3)
    assert isinstance(module, torch.nn.Dropout) and module.state_dict() == {}
    assert (module(torch.ones(10_000)) == 0).float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert torch.equal(module.eval()(x), x)


def test_sparse_attention_dropout_averages_to_the_undropped_attention():
    """Dropout on the attention weights keeps E[out] = eval output; SDPA's own (torch) dropout, for
    comparison, has the same spread over repeated calls."""
    torch.manual_seed(0)
    attention = FastMultiheadAttention(16, 2, dropout=0.2)
    query, key = torch.randn(6, 1, 16), torch.randn(9, 1, 16)
    with torch.no_grad():
        expected = attention.eval()(query, key, key)[0]
        attention.train()
        torch_draws = torch.stack([attention(query, key, key)[0] for _ in range(400)])
        attention.sparse_dropout = True
        sparse_draws = torch.stack([attention(query, key, key)[0] for _ in range(400)])
    for draws in (torch_draws, sparse_draws):
        assert not torch.equal(draws[0], draws[1])
        spread = draws.std(0)
        assert ((draws.mean(0) - expected).abs() < 5 * spread / 20 + 1e-6).all()
    ratio = (sparse_draws.std(0) / torch_draws.std(0)).median().item()
    assert 0.8 < ratio < 1.25


def test_sparse_attention_dropout_ignores_padded_keys():
    torch.manual_seed(0)
    attention = FastMultiheadAttention(16, 2, dropout=0.3).train()
    attention.sparse_dropout = True
    query, key = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    value = torch.randn(7, 2, 16, requires_grad=True)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    out = attention(query, key, value, key_padding_mask=padding)[0]
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert (value.grad[4:, 1] == 0).all() and (value.grad[:4, 1] != 0).any()
