"""DETR's encoder-decoder transformer (sequence-first tensors, [S, B, d]).

Differences from torch.nn.Transformer, as in the paper: positional encodings are added to the
queries and keys of every attention layer (not to the values), the decoder also gets the learned
query embedding at every layer, and it returns each layer's normalised output for the aux losses.

Group DETR (training only, --group_detr K): the decoder gets K groups of queries one after the
other ([K*Q, B, d]); cross-attention and the FFN treat them as more queries, but self-attention
stays inside each group. That equals a block-diagonal attention mask and is computed as one: the
groups move into the batch dimension for the self-attention ([Q, K*B, d]), so each query only
sees the Q queries of its own group (and no K*Q x K*Q score matrix is formed).
"""
import copy
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import MultiheadAttention


def _with_pos(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


def _groups_to_batch(x: Tensor, num_groups: int) -> Tensor:
    """[K*Q, B, d] (groups one after the other) -> [Q, K*B, d]: self-attention then stays in a group."""
    if num_groups == 1:
        return x
    kq, b, d = x.shape
    return x.view(num_groups, kq // num_groups, b, d).transpose(0, 1).reshape(kq // num_groups, num_groups * b, d)


def _groups_from_batch(x: Tensor, num_groups: int) -> Tensor:
    """Inverse of _groups_to_batch: [Q, K*B, d] -> [K*Q, B, d]."""
    if num_groups == 1:
        return x
    q, kb, d = x.shape
    return x.view(q, num_groups, kb // num_groups, d).transpose(0, 1).reshape(num_groups * q, kb // num_groups, d)


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "glu":
        return F.glu
    raise ValueError(f"activation should be relu, gelu or glu, not {name!r}")


class TransformerEncoderLayer(nn.Module):
    """Self-attention (q = k = src + pos, v = src) then FFN, each with residual, dropout and LayerNorm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            src2 = self.norm1(src)
            q = k = _with_pos(src2, pos)
            src = src + self.dropout1(self.self_attn(q, k, src2, key_padding_mask=src_key_padding_mask)[0])
            src2 = self.norm2(src)
            return src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(src2)))))
        q = k = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, key_padding_mask=src_key_padding_mask)[0]))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(src))))))


class TransformerDecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to the memory (`multihead_attn`), then FFN.

    To read the cross-attention weights (e.g. tools/visualize_attention.py), hook
    `multihead_attn` (called as multihead_attn(query=[Q,B,d], key=[S,B,d], value=..., key_padding_mask=[B,S]))
    or call it again with need_weights=True.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _self_attention(self, q: Tensor, v: Tensor, num_groups: int) -> Tensor:
        """Self-attention of the queries within each of `num_groups` consecutive groups."""
        q, v = _groups_to_batch(q, num_groups), _groups_to_batch(v, num_groups)
        return _groups_from_batch(self.self_attn(q, q, v)[0], num_groups)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None, num_groups: int = 1) -> Tensor:
        if self.normalize_before:
            tgt2 = self.norm1(tgt)
            tgt = tgt + self.dropout1(self._self_attention(_with_pos(tgt2, query_pos), tgt2, num_groups))
            tgt2 = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(query=_with_pos(tgt2, query_pos), key=_with_pos(memory, pos),
                                                          value=memory, key_padding_mask=memory_key_padding_mask)[0])
            tgt2 = self.norm3(tgt)
            return tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(tgt2)))))
        tgt = self.norm1(tgt + self.dropout1(self._self_attention(_with_pos(tgt, query_pos), tgt, num_groups)))
        tgt2 = self.multihead_attn(query=_with_pos(tgt, query_pos), key=_with_pos(memory, pos), value=memory,
                                   key_padding_mask=memory_key_padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(tgt))))))


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        output = src
        for layer in self.layers:
            output = layer(output, src_key_padding_mask=src_key_padding_mask, pos=pos)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoder(nn.Module):
    """Returns [num_layers, Q, B, d] (every layer, each through the final norm) or [1, Q, B, d]."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module, return_intermediate: bool = False):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None, num_groups: int = 1) -> Tensor:
        output = tgt
        intermediate: List[Tensor] = []
        for layer in self.layers:
            output = layer(output, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos,
                           query_pos=query_pos, num_groups=num_groups)
            if self.return_intermediate:
                intermediate.append(self.norm(output))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self.norm(output).unsqueeze(0)


class Transformer(nn.Module):
    """forward(src [B,d,H,W], mask [B,H,W], query_embed [Q,d], pos_embed [B,d,H,W], num_groups=1)
    -> (hs [layers, B, Q, d], memory [B, d, H, W]). With num_groups K, query_embed holds K groups
    of Q/K queries one after the other and decoder self-attention stays inside each group."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False, return_intermediate_dec: bool = False):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                          return_intermediate=return_intermediate_dec)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model = d_model
        self.nhead = nhead

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                num_groups: int = 1) -> Tuple[Tensor, Tensor]:
        if query_embed.shape[0] % num_groups != 0:
            raise ValueError(f"Transformer: {query_embed.shape[0]} queries do not split into {num_groups} groups")
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).repeat(1, bs, 1)
        mask = mask.flatten(1)
        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed,
                          num_groups=num_groups)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


def build_transformer(args) -> Transformer:
    return Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                       num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                       dropout=args.dropout, normalize_before=args.pre_norm, return_intermediate_dec=True)
