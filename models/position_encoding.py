"""Positional encodings of a feature map: [B, 2*num_pos_feats, H, W] from its padding mask."""
import math
from typing import Optional

import torch
from torch import nn

from util.nested_tensor import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """The transformer paper's sine encoding on 2-D pixel positions, counted over non-padding pixels.

    Output channels: the y part (num_pos_feats) then the x part (num_pos_feats), each with sin on
    even and cos on odd features.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: int = 10000, normalize: bool = False,
                 scale: Optional[float] = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, tensor_list: NestedTensor) -> torch.Tensor:
        mask = tensor_list.mask
        assert mask is not None
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # stack(sin of evens, cos of odds) then flatten interleaves them back: sin0, cos1, sin2, ...
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: 50-row tables for columns and rows; output x part then y part."""

    def __init__(self, num_pos_feats: int = 256):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> torch.Tensor:
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        if h > 50 or w > 50:
            raise ValueError(f"PositionEmbeddingLearned: feature map {h}x{w} is larger than its 50x50 tables")
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)


def build_position_encoding(args) -> nn.Module:
    """--position_embedding sine (normalised, hidden_dim/2 features per axis) or learned."""
    n_steps = args.hidden_dim // 2
    if args.position_embedding in ("v2", "sine"):
        return PositionEmbeddingSine(n_steps, normalize=True)
    if args.position_embedding in ("v3", "learned"):
        return PositionEmbeddingLearned(n_steps)
    raise ValueError(f"--position_embedding {args.position_embedding!r} is not supported; use 'sine' or 'learned'")
