"""A batch of images of different sizes: one padded tensor plus a mask that is True on padding.

Works under torch.jit.script and ONNX tracing, like the original's `util.misc.NestedTensor`.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class NestedTensor:
    """`tensors [B, C, H, W]` padded bottom/right, `mask [B, H, W]` bool (True = padding)."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device: torch.device, non_blocking: bool = False) -> "NestedTensor":
        mask = self.mask
        cast_mask = mask.to(device, non_blocking=non_blocking) if mask is not None else None
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), cast_mask)

    def decompose(self):
        return self.tensors, self.mask

    def __repr__(self) -> str:
        return str(self.tensors)


def nested_tensor_from_tensor_list(tensor_list: List[Tensor]) -> NestedTensor:
    """List of [C, H_i, W_i] tensors -> NestedTensor padded with zeros to the largest H and W.

    Any number of leading dims is padded the same way (the criterion pads [N, H, W] mask stacks).
    """
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list: got an empty list of images")
    if tensor_list[0].dim() != 3:
        raise ValueError(f"nested_tensor_from_tensor_list: expected [C, H, W] tensors, got {tensor_list[0].dim()} dims")
    if torch.jit.is_scripting() or not torch.jit.is_tracing():
        return _pad_eager(tensor_list)
    return _pad_traced(tensor_list)


def _pad_eager(tensor_list: List[Tensor]) -> NestedTensor:
    max_size = [0, 0, 0]
    for img in tensor_list:
        for i in range(3):
            max_size[i] = max(max_size[i], int(img.shape[i]))
    first = tensor_list[0]
    batch = torch.zeros([len(tensor_list)] + max_size, dtype=first.dtype, device=first.device)
    mask = torch.ones((len(tensor_list), max_size[1], max_size[2]), dtype=torch.bool, device=first.device)
    for i, img in enumerate(tensor_list):
        batch[i, : img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return NestedTensor(batch, mask)


@torch.jit.unused
def _pad_traced(tensor_list: List[Tensor]) -> NestedTensor:
    # Tracing records sizes as tensors only through stack/max and F.pad, not through in-place
    # copies into a preallocated buffer, so the exported graph stays valid for other sizes.
    max_size = [torch.stack([torch._shape_as_tensor(img)[i] for img in tensor_list]).max() for i in range(3)]
    padded, masks = [], []
    for img in tensor_list:
        pad = [m - s for m, s in zip(max_size, torch._shape_as_tensor(img))]
        padded.append(F.pad(img, (0, pad[2], 0, pad[1], 0, pad[0])))
        valid = torch.zeros_like(img[0], dtype=torch.int32)
        masks.append(F.pad(valid, (0, pad[2], 0, pad[1]), value=1).to(torch.bool))
    return NestedTensor(torch.stack(padded), torch.stack(masks))


def collate_fn(batch):
    """DataLoader collate: [(image [3,H,W], target), ...] -> (NestedTensor, tuple of targets)."""
    images, targets = tuple(zip(*batch))
    return nested_tensor_from_tensor_list(list(images)), targets
