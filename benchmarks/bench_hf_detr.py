"""Optional peer: Hugging Face transformers' DetrForObjectDetection next to the project's model, same input.

Runs only where `transformers` is installed (it is not a dependency of the project; nothing is
installed or downloaded here); otherwise it says so and writes a JSON with the reason. Both
models have the DETR-R50 shape (ResNet-50, hidden 256, 6+6 layers, 100 queries, 91 classes) with
random weights, so only the times compare, not the outputs.

    python benchmarks/bench_hf_detr.py
"""
from __future__ import annotations

import importlib.util

import torch

from common import base_parser, machine_info, median, print_machine, setup, time_alternating, write_json


def hf_model(num_classes: int, num_queries: int, hidden_dim: int, layers: int, ffn: int, backbone_depth: str):
    """DetrForObjectDetection of the given shape with a transformers ResNet backbone (no timm, no download)."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    depths = {"resnet18": ([2, 2, 2, 2], "basic"), "resnet50": ([3, 4, 6, 3], "bottleneck")}[backbone_depth]
    hidden_sizes = [64, 128, 256, 512] if depths[1] == "basic" else [256, 512, 1024, 2048]
    resnet = ResNetConfig(depths=depths[0], layer_type=depths[1], hidden_sizes=hidden_sizes,
                          out_features=["stage4"])
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=resnet,
                        num_labels=num_classes, num_queries=num_queries, d_model=hidden_dim,
                        encoder_layers=layers, decoder_layers=layers, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                        auxiliary_loss=False)
    return DetrForObjectDetection(config)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    device = setup(args)
    info = machine_info(device)
    print_machine(info)
    if importlib.util.find_spec("transformers") is None:
        reason = "transformers is not installed; this optional comparison is skipped (pip install transformers to run it)"
        print(reason, flush=True)
        write_json("hf_detr", {"benchmark": "hf_detr", "machine": info, "quick": args.quick,
                               "skipped": reason}, args.out)
        return

    from detr_setup import FULL, QUICK, build_detr, random_images

    shape = QUICK if args.quick else FULL
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    project = build_detr(shape, aux_loss=False).eval().to(device)
    peer = hf_model(shape.num_classes, shape.num_queries, shape.hidden_dim, shape.enc_layers,
                    shape.dim_feedforward, shape.backbone).eval().to(device)
    images = random_images(shape, 1).to(device)
    pixel_mask = torch.ones(1, *shape.image_hw, dtype=torch.long, device=device)

    def run_project():
        with torch.inference_mode():
            project(images)

    def run_peer():
        with torch.inference_mode():
            peer(pixel_values=images, pixel_mask=pixel_mask)

    times = time_alternating({"project": run_project, "hf_detr": run_peer}, warmup, repeats, device)
    rows = {name: {"median_s": median(t), "times_s": t} for name, t in times.items()}
    ratio = rows["hf_detr"]["median_s"] / rows["project"]["median_s"]
    print(f"batch 1 {shape.image_hw}: project {rows['project']['median_s']:.3f} s, "
          f"HF DETR {rows['hf_detr']['median_s']:.3f} s, project is {ratio:.2f}x faster", flush=True)
    write_json("hf_detr", {"benchmark": "hf_detr", "machine": info, "quick": args.quick,
                           "config": {"model": shape.__dict__, "warmup": warmup, "repeats": repeats},
                           "results": rows, "hf_over_project": ratio}, args.out)


if __name__ == "__main__":
    main()
