"""Sine and learned position encodings against hand-computed values."""
import math
import types

import pytest
import torch

from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, build_position_encoding
from util.nested_tensor import NestedTensor


def _nested(mask: torch.Tensor) -> NestedTensor:
    return NestedTensor(torch.zeros(mask.shape[0], 3, *mask.shape[1:]), mask)


def test_sine_unnormalised_by_hand():
    # F = 4 features per axis: divisors 1, 1, 100, 100 (temperature 10000 ** (2 * floor(i/2) / 4)).
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = PositionEmbeddingSine(num_pos_feats=4, temperature=10000)(_nested(mask))
    assert pos.shape == (1, 8, 2, 3)
    y, x = 2.0, 3.0  # pixel (row 1, col 2): cumulative counts 2 and 3
    expected_y = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100)]
    expected_x = [math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    assert pos[0, :, 1, 2].tolist() == pytest.approx(expected_y + expected_x, abs=1e-6)


def test_sine_normalised_counts_only_real_pixels():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, :, 2] = True  # last column is padding
    pos = PositionEmbeddingSine(num_pos_feats=2, normalize=True)(_nested(mask))
    # x counts per row: 1, 2, 2 (padding repeats the last); normalised by 2 (+1e-6) times 2*pi.
    x = torch.tensor([1.0, 2.0, 2.0]) / (2 + 1e-6) * 2 * math.pi
    assert torch.allclose(pos[0, 2, 0], x.sin(), atol=1e-6)  # x part starts after the 2 y features
    assert torch.allclose(pos[0, 3, 0], x.cos(), atol=1e-6)
    y = torch.tensor([1.0, 2.0]) / (2 + 1e-6) * 2 * math.pi
    assert torch.allclose(pos[0, 0, :, 0], y.sin(), atol=1e-6)


def test_sine_scale_needs_normalize():
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(scale=1.0)


def test_learned_is_x_then_y():
    enc = PositionEmbeddingLearned(num_pos_feats=4)
    pos = enc(_nested(torch.zeros(2, 3, 5, dtype=torch.bool)))
    assert pos.shape == (2, 8, 3, 5)
    assert torch.equal(pos[1, :4, 2, 4], enc.col_embed.weight[4])
    assert torch.equal(pos[1, 4:, 2, 4], enc.row_embed.weight[2])


def test_build_from_args():
    args = types.SimpleNamespace(hidden_dim=64, position_embedding="sine")
    enc = build_position_encoding(args)
    assert isinstance(enc, PositionEmbeddingSine) and enc.num_pos_feats == 32 and enc.normalize
    args.position_embedding = "learned"
    assert isinstance(build_position_encoding(args), PositionEmbeddingLearned)
    args.position_embedding = "rope"
    with pytest.raises(ValueError, match="position_embedding"):
        build_position_encoding(args)
