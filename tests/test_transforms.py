"""The augmentation recipe: boxes and masks follow flips, resizes and crops (geometry by hand)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import transforms as T


def _target(h=100, w=150):
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 20:60, 10:50] = 1
    masks[1, 90:100, 140:150] = 1
    return {"boxes": torch.tensor([[10.0, 20, 50, 60], [140, 90, 150, 100]]), "labels": torch.tensor([1, 2]),
            "area": torch.tensor([1600.0, 100.0]), "iscrowd": torch.zeros(2, dtype=torch.int64), "masks": masks,
            "size": torch.tensor([h, w]), "orig_size": torch.tensor([h, w])}


def _image(h=100, w=150, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))


def test_hflip_mirrors_boxes_and_masks():
    image, target = T.hflip(_image(), _target())
    assert torch.equal(target["boxes"].abs(), torch.tensor([[100.0, 20, 140, 60], [0, 90, 10, 100]]))
    assert target["masks"][0, 20:60, 100:140].all() and target["masks"][0].sum() == 1600
    assert torch.equal(image, _image().flip(-1))


@pytest.mark.parametrize("hw,size,max_size,expected", [
    ((480, 640), 800, 1333, (800, 1066)),     # long side int(800 * 640 / 480) = 1066 (truncated)
    ((100, 2000), 800, 1333, (67, 1340)),     # capped: size = round(1333 * 100 / 2000) = 67; the
    # long side int(67 * 2000 / 100) = 1340 overshoots 1333 by rounding, exactly as the original
    ((800, 600), 800, 1333, (1066, 800)),
    ((600, 800), 600, None, (600, 800)),      # already at size: unchanged
])
def test_resized_hw_matches_the_original_arithmetic(hw, size, max_size, expected):
    assert T.resized_hw(hw, size, max_size) == expected


def test_resize_scales_boxes_area_and_masks_by_exact_ratios():
    image, target = T.resize(_image(), _target(), 50)
    assert image.shape == (3, 50, 75)
    assert torch.allclose(target["boxes"], torch.tensor([[5.0, 10, 25, 30], [70, 45, 75, 50]]))
    assert torch.allclose(target["area"], torch.tensor([400.0, 25.0]))
    assert target["masks"].shape == (2, 50, 75) and target["masks"][0].sum() == 400
    assert target["size"].tolist() == [50, 75] and target["orig_size"].tolist() == [100, 150]


def test_crop_shifts_clamps_and_drops_objects_left_without_area():
    image, target = T.crop(_image(), _target(), top=30, left=5, height=60, width=100)
    assert image.shape == (3, 60, 100)
    # box 0 [10,20,50,60] -> shifted [5,-10,45,30] -> clamped [5,0,45,30]; box 1 lies outside.
    assert target["boxes"].tolist() == [[5.0, 0.0, 45.0, 30.0]]
    assert target["area"].tolist() == [1200.0] and target["labels"].tolist() == [1]
    assert target["masks"].shape == (1, 60, 100) and target["masks"][0].sum() == 30 * 40
    assert target["size"].tolist() == [60, 100]


def test_crop_that_removes_every_box_gives_empty_targets_through_normalize():
    image, target = T.crop(_image(), _target(), top=0, left=60, height=40, width=40)
    image, target = T.Normalize()(image, target)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 40, 40) and image.shape == (3, 40, 40)


def test_random_size_crop_works_on_images_smaller_than_the_crop_range():
    crop = T.RandomSizeCrop(384, 600)
    for seed in range(20):
        random.seed(seed)
        image, target = crop(_image(40, 50), _target(40, 50))
        h, w = image.shape[-2:]
        assert 1 <= h <= 40 and 1 <= w <= 50 and target["size"].tolist() == [h, w]


def test_normalize_gives_cxcywh_divided_by_image_size():
    image, target = T.Normalize()(_image(), _target())
    assert torch.allclose(target["boxes"][0], torch.tensor([30 / 150, 40 / 100, 40 / 150, 40 / 100]))
    expected = (_image()[0, 0, 0].float() / 255 - 0.485) / 0.229
    assert image.dtype == torch.float32 and torch.isclose(image[0, 0, 0], expected)


def test_normalize_of_an_hwc_strided_image_is_contiguous_and_leaves_float_input_alone():
    hwc = _image().permute(1, 2, 0).contiguous().permute(2, 0, 1)  # how decoded images are laid out
    image, _ = T.Normalize()(hwc)
    assert image.is_contiguous() and torch.equal(image, T.Normalize()(_image())[0])
    floats = _image().float() / 255
    kept = floats.clone()
    normalised, _ = T.Normalize()(floats)
    assert torch.equal(floats, kept) and not torch.equal(normalised, floats)


def _smooth_image(h, w):
    coarse = np.random.default_rng(1).integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BICUBIC)


def test_val_transform_equals_a_pil_bilinear_resize():
    pil = _smooth_image(300, 400)
    reference = pil.resize((1066, 800), Image.BILINEAR)
    reference = torch.from_numpy(np.asarray(reference, dtype=np.float32)).permute(2, 0, 1) / 255
    mean, std = torch.tensor(T.IMAGENET_MEAN)[:, None, None], torch.tensor(T.IMAGENET_STD)[:, None, None]
    val = T.make_detr_transforms("val")
    tensor_input = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
    for source in (pil, tensor_input):
        image, target = val(source, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
        assert image.shape == (3, 800, 1066) and target["size"].tolist() == [800, 1066]
        diff = (image * std + mean - reference).abs()
        # Within interpolation noise: a 1/255 rounding step at most, almost never that.
        assert diff.max() <= 1.5 / 255 and diff.mean() < 0.2 / 255


def test_image_scale_scales_every_size_of_the_recipe():
    train = T.make_detr_transforms("train", image_scale=0.16)
    select = train.transforms[1]
    assert select.first.sizes == [77, 82, 87, 92, 97, 102, 108, 113, 118, 123, 128]
    assert select.first.max_size == 213
    assert select.second.transforms[0].sizes == [64, 80, 96]
    assert (select.second.transforms[1].min_size, select.second.transforms[1].max_size) == (61, 96)
    default = T.make_detr_transforms("train").transforms[1]
    assert default.first.sizes == list(range(480, 801, 32)) and default.first.max_size == 1333
    val = T.make_detr_transforms("val", image_scale=0.16).transforms[0]
    assert val.sizes == [128] and val.max_size == 213


def test_train_recipe_is_seeded_and_keeps_boxes_normalised():
    train = T.make_detr_transforms("train", image_scale=0.16)
    shapes = []
    for seed in range(12):
        random.seed(seed)
        torch.manual_seed(seed)
        image, target = train(_image(), _target())
        h, w = image.shape[-2:]
        assert target["size"].tolist() == [h, w] and target["masks"].shape[-2:] == (h, w)
        boxes = target["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and len(boxes) == len(target["labels"])
        shapes.append((h, w))
        random.seed(seed)
        torch.manual_seed(seed)
        again, _ = train(_image(), _target())
        assert torch.equal(image, again)
    assert len(set(shapes)) > 3  # the random sizes really vary


def test_bad_image_set_and_scale_are_refused():
    with pytest.raises(ValueError, match="image_set"):
        T.make_detr_transforms("test")
    with pytest.raises(ValueError, match="image_scale"):
        T.make_detr_transforms("train", image_scale=0)
    with pytest.raises(ValueError, match="augment must be one of"):
        T.make_detr_transforms("train", augment="crop")


def test_lighter_augmentations_resize_as_val_and_flip_or_not():
    val_image, val_target = T.make_detr_transforms("val", image_scale=0.16)(_image(), _target())
    assert val_image.shape[-2:] == (128, 192)
    none_image, none_target = T.make_detr_transforms("train", image_scale=0.16, augment="none")(_image(), _target())
    assert torch.equal(none_image, val_image) and torch.equal(none_target["boxes"], val_target["boxes"])
    flip = T.make_detr_transforms("train", image_scale=0.16, augment="flip")
    flipped = 0
    for seed in range(8):
        random.seed(seed)
        image, target = flip(_image(), _target())
        assert image.shape == val_image.shape
        if torch.equal(image, val_image):
            assert torch.equal(target["boxes"], val_target["boxes"])
        else:  # mirrored: image columns reversed, cx -> 1 - cx, the rest kept
            flipped += 1
            assert torch.equal(image, val_image.flip(-1))
            expected = val_target["boxes"].clone()
            expected[:, 0] = 1 - expected[:, 0]
            assert torch.allclose(target["boxes"], expected, atol=1e-6)
    assert 0 < flipped < 8
    # the val transform is the same whatever --augment says
    assert torch.equal(T.make_detr_transforms("val", 0.16, augment="detr")(_image(), _target())[0], val_image)


def _original_draws(hw, scales, max_size):
    """The original recipe's random draws in its order: (flipped, expected output (h, w))."""
    flipped = random.random() < 0.5
    if random.random() < 0.5:
        return flipped, T.resized_hw(hw, random.choice(scales), max_size)
    hw = T.resized_hw(hw, random.choice([400, 500, 600]), None)
    w = random.randint(384, min(hw[1], 600))
    h = random.randint(384, min(hw[0], 600))
    if (h, w) != hw:
        torch.randint(0, hw[0] - h + 1, (1,))
        torch.randint(0, hw[1] - w + 1, (1,))
    return flipped, T.resized_hw((h, w), random.choice(scales), max_size)


def test_random_draws_follow_the_original_order():
    """Seeded like the original, the recipe lands on the original's sizes and leaves both RNGs alike."""
    train = T.make_detr_transforms("train")
    image = _image(480, 640)
    for seed in range(10):
        random.seed(seed)
        torch.manual_seed(seed)
        _, expected_hw = _original_draws((480, 640), list(range(480, 801, 32)), 1333)
        after = (random.random(), float(torch.rand(1)))
        random.seed(seed)
        torch.manual_seed(seed)
        out, _ = train(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
        assert tuple(out.shape[-2:]) == expected_hw
        assert (random.random(), float(torch.rand(1))) == after
