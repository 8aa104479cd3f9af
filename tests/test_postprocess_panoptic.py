"""PostProcessPanoptic on hand-made masks: stuff merging, tiny-segment dropping, ids from 1 (0 = VOID)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.segmentation import PostProcessPanoptic, rgb2id

NO_OBJECT = 6  # classes 0..5; things are 1 and 2, stuff 3, 4, 5
IS_THING = {i: i in (1, 2) for i in range(7)}


def _query(label: int, confident: bool = True) -> torch.Tensor:
    logits = torch.full((7,), -10.0)
    logits[label] = 10.0 if confident else 0.0
    return logits


def _outputs():
    """8x8 image: stuff 5 (two queries) on columns 0-4, thing 1 on columns 5-7, a 2-pixel thing 2."""
    masks = torch.full((6, 8, 8), -10.0)
    masks[0, :, 0:3] = 10.0
    masks[0, :, 3:5] = 5.0  # query 0 is second best where query 1 lies
    masks[1, :, 3:5] = 10.0
    masks[2, :, 5:8] = 10.0
    masks[4, :, :] = 30.0  # dropped: no-object query
    masks[5, 0:2, 7] = 20.0  # a 2-pixel segment, dropped as too small
    logits = torch.stack([_query(5), _query(5), _query(1), _query(2, confident=False), _query(NO_OBJECT), _query(2)])
    return {"pred_logits": logits[None], "pred_masks": masks[None], "pred_boxes": torch.full((1, 6, 4), 0.5)}


def _ids(png: bytes) -> np.ndarray:
    return rgb2id(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


def test_stuff_merged_small_dropped_ids_from_one():
    post = PostProcessPanoptic(IS_THING, threshold=0.85)
    (pred,) = post(_outputs(), [(8, 8)])
    assert pred["segments_info"] == [{"id": 1, "isthing": False, "category_id": 5, "area": 40},
                                     {"id": 2, "isthing": True, "category_id": 1, "area": 24}]
    ids = _ids(pred["png_string"])
    assert ids.shape == (8, 8)
    assert (ids == 0).sum() == 0  # no pixel left as VOID
    assert (ids[:, :5] == 1).all() and (ids[:, 5:] == 2).all()


def test_areas_are_measured_at_the_target_size():
    # At 16x16 the 2-pixel segment covers 8 pixels (> 4), so it stays, as in the original.
    (pred,) = PostProcessPanoptic(IS_THING)(_outputs(), [(8, 8)], [(16, 16)])
    assert [(s["id"], s["category_id"], s["area"]) for s in pred["segments_info"]] == [(1, 5, 160), (2, 1, 88),
                                                                                        (3, 2, 8)]
    ids = _ids(pred["png_string"])
    assert ids.shape == (16, 16) and (ids[0:4, 14:16] == 3).all()


def test_nothing_kept_gives_void_image_and_no_segments():
    outputs = _outputs()
    outputs["pred_logits"][:] = _query(NO_OBJECT)
    (pred,) = PostProcessPanoptic(IS_THING)(outputs, [(8, 8)])
    assert pred["segments_info"] == []
    assert (_ids(pred["png_string"]) == 0).all()


def test_processed_size_crops_before_target_resize():
    # Masks of a 4x8 processed image: upsampled to (4, 8) and resized to the 4x8 target.
    (pred,) = PostProcessPanoptic(IS_THING)(_outputs(), [(4, 8)], [(4, 8)])
    areas = {s["category_id"]: s["area"] for s in pred["segments_info"]}
    assert sum(areas.values()) == 32 and set(areas) == {5, 1}
