"""Copy-paste augmentation (Ghiasi et al., "Simple Copy-Paste", CVPR 2021), training only.

Objects cut out of another training image along their instance polygons are pasted into this
one at random free places (`--copy_paste N`: up to N objects per image), so each step matches
more queries to objects (docs/convergence.md). The model is unchanged; only the training images are.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou


def paste_objects(image: Tensor, target: dict, source: Tensor, objects: list[tuple[Tensor, int]],
                  max_iou: float = 0.1, tries: int = 10, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, dict]:
    """Paste `objects` ([(mask bool [h,w] of `source`, category id)]) of `source` (uint8 [3,H',W'])
    into `image` (uint8 [3,H,W]) with its `target` (absolute xyxy boxes, before the transforms).

    Each object keeps its size; it goes where its box overlaps every box already there by IoU <
    max_iou (`tries` random places, else it is skipped). Returns new tensors: the inputs are not
    modified. Pasted objects get boxes tight around their pixels, their label, area = pixel count,
    iscrowd 0; with target["masks"] their mask is appended and the pixels they cover are removed
    from the masks below them.
    """
    height, width = image.shape[-2:]
    image = image.clone()
    occupied = target["boxes"].float()  # xyxy of every object already in the image
    added_boxes, added_labels, added_areas, added_masks = [], [], [], []
    for mask, label in objects:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys) == 0:
            continue
        y0, x0, y1, x1 = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
        h, w = y1 - y0, x1 - x0
        if h >= height or w >= width:
            continue
        for _ in range(tries):
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            box = [float(left), float(top), float(left + w), float(top + h)]
            if len(occupied) == 0 or box_iou(torch.tensor([box]), occupied).max() < max_iou:
                break
        else:
            continue
        patch = mask[y0:y1, x0:x1]
        region = image[:, top:top + h, left:left + w]
        image[:, top:top + h, left:left + w] = torch.where(patch, source[:, y0:y1, x0:x1], region)
        added_boxes.append(box)
        occupied = torch.cat([occupied, torch.tensor([box])])
        added_labels.append(label)
        added_areas.append(float(patch.sum()))
        if "masks" in target:
            full = torch.zeros((height, width), dtype=torch.bool)
            full[top:top + h, left:left + w] = patch
            added_masks.append(full)
    if not added_boxes:
        return image, target
    target = dict(target)
    target["boxes"] = torch.cat([target["boxes"], torch.tensor(added_boxes, dtype=target["boxes"].dtype)])
    target["labels"] = torch.cat([target["labels"], torch.tensor(added_labels, dtype=torch.int64)])
    target["area"] = torch.cat([target["area"], torch.tensor(added_areas, dtype=target["area"].dtype)])
    target["iscrowd"] = torch.cat([target["iscrowd"], torch.zeros(len(added_boxes), dtype=torch.int64)])
    if "masks" in target:
        masks = target["masks"].bool()
        for i, new in enumerate(added_masks):  # a later object covers the ones below it
            masks = masks & ~new
            added_masks[:i] = [m & ~new for m in added_masks[:i]]
        target["masks"] = torch.cat([masks, torch.stack(added_masks)]).to(target["masks"].dtype)
    return image, target
