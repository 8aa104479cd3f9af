"""Mask head for DETR (panoptic / instance segmentation) and its post-processors."""
import io
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from models.detr import as_nested_tensor
from util.nested_tensor import NestedTensor


class DETRsegm(nn.Module):
    """DETR plus a mask per query: adds 'pred_masks' [B, Q, H/4, W/4] (logits) to DETR's outputs.

    The box model sits under `detr.`; freeze_detr=True trains only the mask head (--frozen_weights).
    """

    def __init__(self, detr: nn.Module, freeze_detr: bool = False):
        super().__init__()
        self.detr = detr
        self.freeze_detr = freeze_detr
        if freeze_detr:
            for p in self.parameters():
                p.requires_grad_(False)
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        channels = detr.backbone.num_channels  # layer4; layer3, 2, 1 have 1/2, 1/4, 1/8 of it
        self.bbox_attention = MHAttentionMap(hidden_dim, hidden_dim, nheads, dropout=0.0)
        self.mask_head = MaskHeadSmallConv(hidden_dim + nheads, [channels // 2, channels // 4, channels // 8], hidden_dim)

    def train(self, mode: bool = True) -> "DETRsegm":
        """As nn.Module.train, but a frozen box model's BatchNorm layers stay in eval mode.

        The released backbones use FrozenBatchNorm2d, which has no running statistics; a box model
        trained with trainable BatchNorm (--backbone_weights none) would otherwise keep updating
        its running mean/var while "frozen". Dropout still follows `mode`, as in the original.
        """
        super().train(mode)
        if self.freeze_detr:
            for module in self.detr.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, samples: NestedTensor):
        if not isinstance(samples, NestedTensor):
            samples = as_nested_tensor(samples)
        features, pos = self.detr.backbone(samples)
        bs = features[-1].tensors.shape[0]
        src, mask = features[-1].decompose()
        assert mask is not None
        src_proj = self.detr.input_proj(src)
        queries, num_groups = self.detr.query_groups()
        hs, memory = self.detr.transformer(src_proj, mask, queries, pos[-1], num_groups)
        outputs_class = self.detr.class_embed(hs)
        outputs_coord = self.detr.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.detr.aux_loss:
            out["aux_outputs"] = self.detr._set_aux_loss(outputs_class, outputs_coord)
        # Masks for group 0 only (Group DETR's extra groups train the box model; see SetCriterion).
        bbox_mask = self.bbox_attention(hs[-1][:, :self.detr.num_queries], memory, mask=mask)
        seg_masks = self.mask_head(src_proj, bbox_mask, [features[2].tensors, features[1].tensors, features[0].tensors])
        out["pred_masks"] = seg_masks.view(bs, self.detr.num_queries, seg_masks.shape[-2], seg_masks.shape[-1])
        return out


def _expand(tensor: Tensor, length: int) -> Tensor:
    """[B, ...] -> [B * length, ...], each item repeated `length` times in a row."""
    return tensor.unsqueeze(1).repeat(1, int(length), 1, 1, 1).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
    """FPN-style conv head: (features, per-query attention maps, skip features) -> [B*Q, 1, H/4, W/4]."""

    def __init__(self, dim: int, fpn_dims: List[int], context_dim: int):
        super().__init__()
        inter_dims = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16, context_dim // 64]
        for i, d in enumerate(inter_dims[:5]):
            if d % 8 != 0:
                raise ValueError(f"MaskHeadSmallConv: width {d} (level {i}) is not divisible by the 8 GroupNorm "
                                 "groups; use hidden_dim a multiple of 128 and hidden_dim + nheads a multiple of 8")
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, dim)
        self.lay2 = nn.Conv2d(dim, inter_dims[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(8, inter_dims[1])
        self.lay3 = nn.Conv2d(inter_dims[1], inter_dims[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(8, inter_dims[2])
        self.lay4 = nn.Conv2d(inter_dims[2], inter_dims[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(8, inter_dims[3])
        self.lay5 = nn.Conv2d(inter_dims[3], inter_dims[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(8, inter_dims[4])
        self.out_lay = nn.Conv2d(inter_dims[4], 1, 3, padding=1)
        self.dim = dim
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter_dims[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter_dims[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter_dims[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: List[Tensor]) -> Tensor:
        x = torch.cat([_expand(x, bbox_mask.shape[1]), bbox_mask.flatten(0, 1)], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        x = self._merge(self.adapter1(fpns[0]), x)
        x = F.relu(self.gn3(self.lay3(x)))
        x = self._merge(self.adapter2(fpns[1]), x)
        x = F.relu(self.gn4(self.lay4(x)))
        x = self._merge(self.adapter3(fpns[2]), x)
        x = F.relu(self.gn5(self.lay5(x)))
        return self.out_lay(x)

    @staticmethod
    def _merge(cur_fpn: Tensor, x: Tensor) -> Tensor:
        """Skip features (repeated per query) + x upsampled (nearest) to their size."""
        if cur_fpn.size(0) != x.size(0):
            cur_fpn = _expand(cur_fpn, x.size(0) // cur_fpn.size(0))
        return cur_fpn + F.interpolate(x, size=cur_fpn.shape[-2:], mode="nearest")


class MHAttentionMap(nn.Module):
    """Per-head attention of each query [B, Q, d] over the memory map [B, d, H, W] -> [B, Q, heads, H, W]
    (softmax over all heads and pixels together, as in the original)."""

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.q_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        self.k_linear = nn.Linear(query_dim, hidden_dim, bias=bias)
        nn.init.zeros_(self.k_linear.bias)
        nn.init.zeros_(self.q_linear.bias)
        nn.init.xavier_uniform_(self.k_linear.weight)
        nn.init.xavier_uniform_(self.q_linear.weight)
        self.normalize_fact = float(hidden_dim / self.num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight.unsqueeze(-1).unsqueeze(-1), self.k_linear.bias)
        head_dim = self.hidden_dim // self.num_heads
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, head_dim)
        kh = k.view(k.shape[0], self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        if mask is not None:
            weights = weights.masked_fill(mask.unsqueeze(1).unsqueeze(1), float("-inf"))
        weights = F.softmax(weights.flatten(2), dim=-1).view(weights.size())
        return self.dropout(weights)


class PostProcessSegm(nn.Module):
    """Adds 'masks' [Q, 1, H, W] uint8 at each image's original size to PostProcess's results."""

    def __init__(self, threshold: float = 0.5, queries_per_chunk: int = 25):
        super().__init__()
        self.threshold = threshold
        self.queries_per_chunk = queries_per_chunk

    @torch.no_grad()
    def forward(self, results: List[Dict], outputs: Dict[str, Tensor], orig_target_sizes: Tensor,
                max_target_sizes: Tensor) -> List[Dict]:
        """orig_target_sizes [B,2]: original (h, w); max_target_sizes [B,2]: processed (h, w) before padding."""
        if len(orig_target_sizes) != len(max_target_sizes):
            raise ValueError("PostProcessSegm: orig_target_sizes and max_target_sizes differ in length")
        max_h, max_w = max_target_sizes.max(0)[0].tolist()
        for i, (pred, processed, original) in enumerate(zip(outputs["pred_masks"], max_target_sizes, orig_target_sizes)):
            img_h, img_w = int(processed[0]), int(processed[1])
            out_size = (int(original[0]), int(original[1]))
            chunks = []
            # Same numbers as upsampling the whole batch to the largest size and cropping, but one
            # image and a few queries at a time, so full-size COCO evaluation fits in memory.
            for part in pred.split(self.queries_per_chunk):
                up = F.interpolate(part[:, None], size=(max_h, max_w), mode="bilinear", align_corners=False)
                keep = (up[:, :, :img_h, :img_w].sigmoid() > self.threshold).float()
                chunks.append(F.interpolate(keep, size=out_size, mode="nearest").byte().cpu())
            results[i]["masks"] = torch.cat(chunks)
        return results


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """[H, W] int ids -> [H, W, 3] uint8 (panopticapi: id = R + 256 G + 256^2 B)."""
    rgb = np.zeros((*id_map.shape, 3), dtype=np.uint8)
    ids = id_map.astype(np.int64)
    for c in range(3):
        rgb[..., c] = ids % 256
        ids = ids // 256
    return rgb


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] int64 ids (panopticapi's encoding)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


class PostProcessPanoptic(nn.Module):
    """Model outputs -> per image {'png_string': PNG bytes of the segment-id image, 'segments_info': [...]}.

    Same pixels and areas as the original, except that segments are numbered from 1: id 0 is
    panopticapi's VOID (unlabelled), which the original wrongly gave its first segment.
    is_thing_map: {class index: True for things}.
    """

    def __init__(self, is_thing_map: Dict[int, bool], threshold: float = 0.85):
        super().__init__()
        self.threshold = threshold
        self.is_thing_map = is_thing_map

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], processed_sizes, target_sizes=None) -> List[Dict]:
        """processed_sizes: (h, w) per image before padding; target_sizes: output (h, w) per image."""
        if target_sizes is None:
            target_sizes = processed_sizes
        if len(processed_sizes) != len(target_sizes) or len(processed_sizes) != len(outputs["pred_logits"]):
            raise ValueError("PostProcessPanoptic: need one processed size and one target size per image")
        no_object = outputs["pred_logits"].shape[-1] - 1
        preds = []
        for logits, masks, size, target_size in zip(outputs["pred_logits"], outputs["pred_masks"],
                                                    processed_sizes, target_sizes):
            scores, classes = logits.softmax(-1).max(-1)
            keep = classes.ne(no_object) & (scores > self.threshold)
            preds.append(self._one_image(scores[keep], classes[keep], masks[keep], _hw(size), _hw(target_size)))
        return preds

    def _one_image(self, scores: Tensor, classes: Tensor, masks: Tensor, size, target_size) -> Dict:
        masks = F.interpolate(masks[:, None], size, mode="bilinear", align_corners=False).squeeze(1).flatten(1)
        classes_list = classes.tolist()
        stuff_groups = defaultdict(list)
        for k, label in enumerate(classes_list):
            if not self._is_thing(label):
                stuff_groups[label].append(k)
        area, seg_img = _ids_and_areas(masks, len(classes_list), size, target_size, list(stuff_groups.values()))
        # Drop tiny segments until none is left. Later passes do not merge (as the original): the
        # segments merged away in the first pass have area 0 and are dropped here.
        while classes_list:
            small = torch.as_tensor([a <= 4 for a in area], dtype=torch.bool)
            if not bool(small.any()):
                break
            keep = ~small
            masks = masks[keep.to(masks.device)]
            classes_list = [c for c, k in zip(classes_list, keep.tolist()) if k]
            area, seg_img = _ids_and_areas(masks, len(classes_list), size, target_size, [])
        segments_info = [{"id": i + 1, "isthing": self._is_thing(c), "category_id": c, "area": a}
                         for i, (c, a) in enumerate(zip(classes_list, area))]
        with io.BytesIO() as out:
            seg_img.save(out, format="PNG")
            return {"png_string": out.getvalue(), "segments_info": segments_info}

    def _is_thing(self, label: int) -> bool:
        if label not in self.is_thing_map:
            raise KeyError(f"PostProcessPanoptic: class {label} is not in is_thing_map (size {len(self.is_thing_map)})")
        return bool(self.is_thing_map[label])


def _hw(size) -> tuple:
    return int(size[0]), int(size[1])


def _ids_and_areas(masks: Tensor, count: int, size, target_size, merge_groups: List[List[int]]):
    """masks [K, h*w] logits -> (area per segment at target size, PIL RGB id image; segment k has id k+1)."""
    h, w = size
    if count == 0:
        ids = torch.zeros((h, w), dtype=torch.long)
    else:
        ids = masks.transpose(0, 1).softmax(-1).argmax(-1).view(h, w).cpu() + 1
        for group in merge_groups:
            for k in group[1:]:
                ids.masked_fill_(ids.eq(k + 1), group[0] + 1)
    final_h, final_w = target_size
    seg_img = Image.fromarray(id2rgb(ids.numpy())).resize((final_w, final_h), resample=Image.NEAREST)
    final_ids = torch.from_numpy(rgb2id(np.asarray(seg_img)))
    counts = torch.bincount(final_ids.flatten(), minlength=count + 1)
    return counts[1:count + 1].tolist(), seg_img
