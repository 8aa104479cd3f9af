"""--finetune: only the class head and query embedding are re-initialised; anything else is an error.

The R50-scale checks build the official checkpoint's state dict from the contract's layout
(tests/data/state_dict/detr_resnet50.tsv, random values, no download) and adapt it to 3 classes / 20
queries, and into the real full-size model.
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from models import build_model
from util.finetune import adapt_for_finetune, init_class_prior, param_groups

# The released layouts, kept in the repository (see tests/test_state_dict.py).
SPEC = Path(__file__).resolve().parent / "data" / "state_dict"
REINITIALISED = ["class_embed.weight", "class_embed.bias", "query_embed.weight"]


def _tsv_state_dict(name: str, resize: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Random tensors with the names/shapes of a released architecture (optionally resized)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for line in (SPEC / f"{name}.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        dims = (resize or {}).get(key, [int(d) for d in re.findall(r"\d+", shape)])
        if dtype == "int64":
            out[key] = torch.randint(0, 10, dims, generator=generator)
        else:
            out[key] = torch.randn(dims, generator=generator)
    return out


class _StateOnly(torch.nn.Module):
    """A model stand-in holding exactly the given tensors under their dotted names."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._tensors = tensors

    def state_dict(self, *args, **kwargs):
        return dict(self._tensors)


def _small_r50(prefix: str = "") -> dict[str, list[int]]:
    return {f"{prefix}class_embed.weight": [4, 256], f"{prefix}class_embed.bias": [4],
            f"{prefix}query_embed.weight": [20, 256]}


def test_r50_checkpoint_adapts_to_3_classes_20_queries():
    ckpt = _tsv_state_dict("detr_resnet50")
    model = _StateOnly(_tsv_state_dict("detr_resnet50", _small_r50()))
    adapted, reinit = adapt_for_finetune(model, ckpt)
    assert sorted(reinit) == sorted(REINITIALISED)
    assert adapted["class_embed.weight"].shape == (4, 256)
    assert adapted["query_embed.weight"].shape == (20, 256)
    assert torch.equal(adapted["class_embed.bias"], model.state_dict()["class_embed.bias"])
    assert set(adapted) == set(ckpt)
    for key, value in ckpt.items():
        if key not in REINITIALISED:
            assert torch.equal(adapted[key], value), key


def test_mask_model_nested_names_adapt():
    ckpt = _tsv_state_dict("detr_resnet50_panoptic")
    model = _StateOnly(_tsv_state_dict("detr_resnet50_panoptic", _small_r50("detr.")))
    _, reinit = adapt_for_finetune(model, ckpt)
    assert sorted(reinit) == sorted("detr." + n for n in REINITIALISED)


def test_other_backbone_is_an_error_listing_every_mismatch():
    ckpt = _tsv_state_dict("detr_resnet101")
    model = _StateOnly(_tsv_state_dict("detr_resnet50", _small_r50()))
    with pytest.raises(ValueError) as err:
        adapt_for_finetune(model, ckpt)
    message = str(err.value)
    # resnet101 has 17 more bottlenecks in layer3 than resnet50: all listed as unexpected.
    assert "backbone.0.body.layer3.22.conv1.weight: in the checkpoint but not in the model" in message
    assert "backbone.0.body.layer3.6.conv1.weight" in message
    extra = set(ckpt) - set(_tsv_state_dict("detr_resnet50"))
    assert len(extra) > 100 and all(name in message for name in extra)
    assert "class_embed.weight" not in message


def test_other_width_lists_name_and_both_shapes():
    ckpt = _tsv_state_dict("detr_resnet50")
    resized = _small_r50()
    resized["input_proj.weight"] = [128, 2048, 1, 1]
    with pytest.raises(ValueError, match=r"input_proj.weight: checkpoint shape \[256, 2048, 1, 1\], "
                                         r"model shape \[128, 2048, 1, 1\]"):
        adapt_for_finetune(_StateOnly(_tsv_state_dict("detr_resnet50", resized)), ckpt)


def test_class_embed_with_other_width_is_not_silently_reinitialised():
    ckpt = _tsv_state_dict("detr_resnet50")
    with pytest.raises(ValueError, match="class_embed.weight: checkpoint shape"):
        adapt_for_finetune(_StateOnly(_tsv_state_dict("detr_resnet50", {"class_embed.weight": [4, 128]})), ckpt)


def test_batchnorm_counters_may_differ():
    ckpt = {"bn.weight": torch.ones(2), "other.num_batches_tracked": torch.tensor(5)}
    model = _StateOnly({"bn.weight": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0)})
    adapted, reinit = adapt_for_finetune(model, ckpt)
    assert reinit == [] and set(adapted) == {"bn.weight", "bn.num_batches_tracked"}
    assert torch.equal(adapted["bn.weight"], torch.ones(2))


def _full_size_args(**overrides) -> argparse.Namespace:
    # 'checkpoint': frozen BatchNorm, nothing loaded; what main.py builds for --finetune.
    args = main.get_args_parser().parse_args(["--backbone_weights", "checkpoint", "--device", "cpu"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_real_r50_model_takes_official_shaped_checkpoint():
    torch.manual_seed(0)
    model, _, _ = build_model(_full_size_args(num_classes=3, num_queries=20))
    ckpt = _tsv_state_dict("detr_resnet50")
    adapted, reinit = adapt_for_finetune(model, ckpt)
    assert sorted(reinit) == sorted(REINITIALISED)
    model.load_state_dict(adapted, strict=True)
    for key, value in model.state_dict().items():
        if key not in REINITIALISED:
            assert torch.equal(value, ckpt[key]), key
    assert model.state_dict()["class_embed.weight"].shape == (4, 256)


TINY = ["--backbone", "resnet18", "--hidden_dim", "32", "--dim_feedforward", "64", "--nheads", "2",
        "--enc_layers", "1", "--dec_layers", "1", "--image_scale", "0.16", "--num_workers", "0", "--device", "cpu"]


def _three_class_data(root: Path) -> list[str]:
    """4 pictures of rectangles with category ids 0, 1, 2 as a custom COCO export; returns main.py flags."""
    from PIL import Image, ImageDraw

    (root / "img").mkdir(parents=True)
    images, annotations = [], []
    for i in range(4):
        picture = Image.new("RGB", (96, 80), (240, 240, 240))
        x, y, category = 10 + 8 * i, 12 + 5 * i, i % 3
        ImageDraw.Draw(picture).rectangle((x, y, x + 29, y + 24), fill=[(200, 0, 0), (0, 200, 0), (0, 0, 200)][category])
        picture.save(root / "img" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 96, "height": 80})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": category, "bbox": [x, y, 30, 25],
                            "area": 750, "iscrowd": 0})
    (root / "ann.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": [{"id": c, "name": n} for c, n in enumerate(["r", "g", "b"])]}))
    return ["--dataset_file", "custom", "--train_images", str(root / "img"), "--train_annotations",
            str(root / "ann.json"), "--val_images", str(root / "img"), "--val_annotations", str(root / "ann.json")]


def test_main_finetune_logs_exactly_the_reinitialised_tensors(tmp_path, repo_root):
    """A 91-class, 100-query checkpoint (tiny widths) fine-tuned by main.py to 3 classes and 20 queries.

    The run logs the three re-initialised tensors and trains them at their new shapes; what
    --finetune loads (main._load_finetune) is the checkpoint's everywhere else.
    """
    source_args = main.get_args_parser().parse_args(TINY + ["--backbone_weights", "checkpoint", "--num_classes", "91"])
    torch.manual_seed(1)
    source, _, _ = build_model(source_args)
    assert source.class_embed.weight.shape[0] == 92 and source.query_embed.weight.shape[0] == 100
    torch.save({"model": source.state_dict(), "args": source_args}, tmp_path / "coco_like.pth")

    run = tmp_path / "run"
    command = [sys.executable, str(repo_root / "main.py"), *TINY, *_three_class_data(tmp_path / "data"),
               "--finetune", str(tmp_path / "coco_like.pth"), "--num_queries", "20", "--epochs", "1",
               "--eval_every", "0", "--batch_size", "2", "--output_dir", str(run)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "re-initialised" in line]
    assert len(lines) == 1
    listed = lines[0].split(": ")[-1].split(", ")
    assert sorted(listed) == sorted(REINITIALISED)

    from util.checkpoint import load_checkpoint

    tuned = load_checkpoint(run / "checkpoint.pth")["model"]
    assert tuned["class_embed.weight"].shape == (4, 32) and tuned["query_embed.weight"].shape == (20, 32)
    target_args = main.get_args_parser().parse_args(TINY + ["--backbone_weights", "checkpoint", "--num_classes", "3",
                                                            "--num_queries", "20"])
    target, _, _ = build_model(target_args)
    main._load_finetune(target, str(tmp_path / "coco_like.pth"), torch.load(tmp_path / "coco_like.pth",
                                                                            weights_only=False))
    original = source.state_dict()
    for key, value in target.state_dict().items():
        if key not in REINITIALISED and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, original[key]), key


def test_param_groups_default_is_the_original_pair_and_head_gets_its_own_lr():
    model, _, _ = build_model(main.get_args_parser().parse_args(TINY + ["--backbone_weights", "none",
                                                                        "--num_classes", "9"]))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plain = param_groups(named, 1e-5)
    assert len(plain) == 2 and plain[1]["lr"] == 1e-5 and "lr" not in plain[0]
    assert [id(p) for p in plain[0]["params"]] == [id(p) for n, p in named if "backbone" not in n]
    split = param_groups(named, 1e-5, head_lr=3e-3)
    head = {id(p) for p in split[2]["params"]}
    assert split[2]["lr"] == 3e-3 and head == {id(model.class_embed.weight), id(model.class_embed.bias),
                                               id(model.query_embed.weight)}
    assert not head & {id(p) for p in split[0]["params"]}
    assert len(split[0]["params"]) + len(split[2]["params"]) == len(plain[0]["params"])


def test_class_prior_sets_the_softmax_of_a_fresh_head():
    model, _, _ = build_model(main.get_args_parser().parse_args(TINY + ["--backbone_weights", "none",
                                                                        "--num_classes", "9"]))
    assert init_class_prior(model, 0.3, [6, 7, 8]) == ["class_embed.bias"]
    probabilities = model.class_embed.bias.detach().softmax(0)
    assert probabilities[-1].item() == pytest.approx(0.7, abs=1e-4)
    assert probabilities[6:9].tolist() == pytest.approx([0.1] * 3, abs=1e-4)
    assert probabilities[:6].max().item() < 1e-5
    with pytest.raises(ValueError, match="--class_prior 1.0"):
        init_class_prior(model, 1.0, [6])


def test_finetune_options_freeze_the_backbone_and_give_the_head_its_lr(tmp_path):
    source_args = main.get_args_parser().parse_args(TINY + ["--backbone_weights", "checkpoint", "--num_classes", "91"])
    torch.manual_seed(1)
    source, _, _ = build_model(source_args)
    torch.save({"model": source.state_dict(), "args": source_args}, tmp_path / "source.pth")
    flags = [*TINY, *_three_class_data(tmp_path / "data"), "--finetune", str(tmp_path / "source.pth"),
             "--num_queries", "20", "--epochs", "1", "--eval_every", "0", "--lr", "1e-3", "--lr_backbone", "1e-3",
             "--batch_size", "2", "--output_dir", str(tmp_path / "run"), "--head_lr_mult", "10",
             "--class_prior", "0.2", "--freeze_backbone_epochs", "1"]
    main.main(main.get_args_parser().parse_args(flags))

    from util.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    tuned, original = checkpoint["model"], source.state_dict()
    backbone = [k for k in tuned if k.startswith("backbone.") and "layer4" in k and k.endswith("weight")]
    assert backbone and all(torch.equal(tuned[k], original[k]) for k in backbone)  # frozen: unchanged
    assert not torch.equal(tuned["transformer.decoder.layers.0.linear1.weight"],
                           original["transformer.decoder.layers.0.linear1.weight"])
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 1e-2])
    assert not set(groups[1]["params"]) & set(checkpoint["optimizer"]["state"])  # no Adam state either
    assert set(groups[2]["params"]) <= set(checkpoint["optimizer"]["state"])
