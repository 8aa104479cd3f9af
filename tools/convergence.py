"""Convergence benchmark: AP50 reached within a wall-clock training budget, on generated data
variants a recipe is tuned on and variants it is only reported on.

    python tools/convergence.py --scenario scratch --budget 1350 --seeds 0 1 2
    python tools/convergence.py --scenario finetune --budget 600 --seeds 0 1 2 \\
        --base_checkpoint outputs/demo_fast/checkpoint.pth
    python tools/convergence.py --scenario scratch --tabulate_only      # table of the runs already made
    python tools/convergence.py --tiny --scenario scratch               # seconds: the harness end to end

Scenarios: `scratch` trains the demo architecture from nothing on each variant; `finetune` starts
from a detector trained on the demo data (--base_checkpoint, or trained here first with the README's
fast recipe, not counted in the budget) and fine-tunes it to a small set of other shapes with other
category ids. Variants (VARIANTS) differ in object counts and sizes, colours, class count and kinds
of shape, picture size, and boxes-only vs polygons; each is generated per seed (datasets/shapes.py)
and read as a custom COCO export. Choose recipes on the `tune` variants; quote the `held_out` ones.

Budget: seconds of training (the sum of the epochs' "Total time" lines of the console, evaluation
excluded), on one machine with nothing else running; runs go one after the other, never side by
side. A run is stopped once its training time passes the budget; its score is the AP50 of the last
evaluation whose training time is within the budget (0 when none is). Output: a markdown table per
scenario (mean over seeds per variant and recipe, the mean over held-out variants and the worst
held-out case) and OUT_ROOT/SCENARIO.json with every run's curve (training seconds, AP50, EMA AP50).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets.shapes import ensure_shapes  # noqa: E402

# The README demo's architecture and data pipeline; every recipe of a scenario shares them.
MODEL = ("--device cpu --backbone resnet18 --backbone_weights none --hidden_dim 128 --enc_layers 2 --dec_layers 2 "
         "--dim_feedforward 256 --num_queries 10 --dropout 0 --augment flip --image_scale 0.16 --batch_size 4 "
         "--print_freq 128")
FAST_COMMON = "--lr 2e-4 --lr_backbone 2e-4 --set_cost_class 2 --eos_coef 0.3"
FAST = f"{FAST_COMMON} --group_detr 10"
FAST_K20 = f"{FAST_COMMON} --group_detr 20"  # the earlier candidates (docs/convergence.md)
FINETUNE = "--lr_backbone 1e-4 --epochs 12 --lr_drop 10"
HEAD = f"{FINETUNE} --head_lr_mult 10 --class_prior 0.3"
# the README's fine-tune line: + the base's query groups kept, the class loss's share of the gradient raised
HEAD_GROUPS_CLS = f"{HEAD} --group_detr 10 --set_cost_class 2 --eos_coef 0.3 --bbox_loss_coef 1 --giou_loss_coef 1"
RECIPES = {
    "scratch": {
        "plain": "--lr_backbone 1e-4 --epochs 24 --lr_drop 18",
        "fast": f"{FAST} --epochs 12 --lr_drop 10 --box_paste 3 --aug_off_epochs 2",
        "fast_k20": f"{FAST_K20} --epochs 12 --lr_drop 10 --box_paste 3 --aug_off_epochs 2",
        "fast_k20_10ep": f"{FAST_K20} --epochs 10 --lr_drop 8 --box_paste 3 --aug_off_epochs 2",
        "fast_copy_paste": f"{FAST_K20} --epochs 12 --lr_drop 10 --copy_paste 3",
        "fast_mosaic": f"{FAST_K20} --epochs 12 --lr_drop 10 --mosaic 0.5 --box_paste 2 --aug_off_epochs 2",
        "fast_groups": f"{FAST_K20} --epochs 12 --lr_drop 10",
    },
    "finetune": {
        "plain": FINETUNE,
        "head": HEAD,
        "head_dense": f"{HEAD} --freeze_backbone_epochs 1 --mosaic 0.5 --box_paste 2 --aug_off_epochs 2",
        "head_groups": f"{HEAD} --group_detr 20 --set_cost_class 2 --eos_coef 0.3",
        "head_groups_b2": f"{HEAD} --group_detr 20 --set_cost_class 2 --eos_coef 0.3 --batch_size 2",
        "head_groups_cls": HEAD_GROUPS_CLS,
    },
}
BASE_RECIPE = RECIPES["scratch"]["fast"]  # the README's fast line: the model users start from
BASE_DATA = {"train_size": 512, "val_size": 64, "image_size": 128, "style": {}}

# Generated data per variant: sizes and datasets.shapes style fields. `tune`: recipes may be chosen on
# it; `held_out`: only reported. The demo data itself (512 images, 128 px, 3 classes) is a tune variant.
VARIANTS = {
    "scratch": {
        "demo": ("tune", {"train_size": 512, "val_size": 64, "image_size": 128, "style": {}}),
        "demo_boxes": ("tune", {"train_size": 512, "val_size": 64, "image_size": 128, "style": {"boxes_only": True}}),
        "crowded": ("tune", {"train_size": 512, "val_size": 64, "image_size": 128,
                             "style": {"max_objects": 8, "radius": [0.06, 0.15]}}),
        "random_colours": ("held_out", {"train_size": 512, "val_size": 64, "image_size": 160,
                                        "style": {"colours": "random"}}),
        # The outline-only reading of the independent check's data, with enough pictures that the
        # plain line starts to learn outlines in its 24 epochs (on random_colours' 512 it hardly does).
        "random_colours_1024": ("held_out", {"train_size": 1024, "val_size": 64, "image_size": 160,
                                             "style": {"colours": "random"}}),
        "boxes_only": ("held_out", {"train_size": 512, "val_size": 64, "image_size": 160,
                                    "style": {"boxes_only": True}}),
        # Colours that tell the class, but not the demo's: each class's colour is drawn from the data seed.
        "palette": ("held_out", {"train_size": 512, "val_size": 64, "image_size": 160,
                                 "style": {"colours": "palette"}}),
        "five_kinds": ("held_out", {"train_size": 512, "val_size": 64, "image_size": 128,
                                    "style": {"kinds": ["circle", "square", "triangle", "star", "cross"],
                                              "first_category_id": 6, "max_objects": 6}}),
        "few_large": ("held_out", {"train_size": 384, "val_size": 64, "image_size": 96,
                                   "style": {"max_objects": 2, "radius": [0.2, 0.35]}}),
    },
    "finetune": {
        "new_three": ("tune", {"train_size": 64, "val_size": 64, "image_size": 128,
                               "style": {"kinds": ["pentagon", "hexagon", "star"], "first_category_id": 6}}),
        "new_three_random_colours": ("tune", {"train_size": 64, "val_size": 64, "image_size": 128,
                                              "style": {"kinds": ["pentagon", "hexagon", "star"],
                                                        "first_category_id": 6, "colours": "random"}}),
        "new_random_colours": ("held_out", {"train_size": 64, "val_size": 64, "image_size": 160,
                                            "style": {"kinds": ["star", "cross", "hexagon"], "first_category_id": 6,
                                                      "colours": "random"}}),
        "new_palette": ("held_out", {"train_size": 64, "val_size": 64, "image_size": 160,
                                     "style": {"kinds": ["star", "cross", "hexagon"], "first_category_id": 6,
                                               "colours": "palette"}}),
        "new_boxes_only": ("held_out", {"train_size": 96, "val_size": 64, "image_size": 128,
                                        "style": {"kinds": ["cross", "pentagon", "square", "star"],
                                                  "first_category_id": 7, "boxes_only": True}}),
        "new_small_set": ("held_out", {"train_size": 64, "val_size": 64, "image_size": 128,
                                       "style": {"kinds": ["hexagon", "cross"], "first_category_id": 10,
                                                 "max_objects": 3}}),
    },
}
# --tiny: the tiny model and data, two epochs, for a check of the harness in seconds.
TINY_MODEL = ("--hidden_dim 32 --dim_feedforward 64 --nheads 2 --enc_layers 1 --dec_layers 1 --num_queries 8 "
              "--batch_size 2 --num_workers 0 --epochs 2 --lr_drop 1 --group_detr 2 --print_freq 100")
TINY_DATA = {"train_size": 8, "val_size": 4, "image_size": 64}
TINY_VARIANTS = {"scratch": ["demo", "boxes_only"], "finetune": ["new_three", "new_boxes_only"]}


def data_folder(data_root: Path, name: str, spec: dict, seed: int, tiny: bool) -> Path:
    """The variant's data for `seed` (generated on first use with data seed 1000 + seed)."""
    sizes = {k: spec[k] for k in ("train_size", "val_size", "image_size")}
    if tiny:
        sizes = dict(TINY_DATA)
    return ensure_shapes(data_root / f"{name}{'_tiny' if tiny else ''}_s{seed}", seed=1000 + seed, **sizes,
                         **spec["style"])


def data_flags(folder: Path) -> list[str]:
    return ["--dataset_file", "custom", "--train_images", str(folder / "train2017"),
            "--train_annotations", str(folder / "annotations" / "instances_train2017.json"),
            "--val_images", str(folder / "val2017"),
            "--val_annotations", str(folder / "annotations" / "instances_val2017.json")]


def needs_polygons(flags: str) -> bool:
    return bool(re.search(r"--copy_paste [1-9]", flags))


def epoch_seconds(console_text: str) -> dict[int, float]:
    """{epoch: training seconds} from the console's `Epoch: [n] Total time: ... (S s / it)` lines,
    S times the epoch's iteration count (from its progress lines `Epoch: [n] [i/N]`)."""
    per_it = {int(e): float(s) for e, s in re.findall(r"Epoch: \[(\d+)\] Total time: \S+ \(([\d.]+) s / it\)",
                                                      console_text)}
    iters = {int(e): int(n) for e, n in re.findall(r"Epoch: \[(\d+)\]\s+\[\s*\d+/(\d+)\]", console_text)}
    return {epoch: per_it[epoch] * iters.get(epoch, 0) for epoch in sorted(per_it)}


def read_curve(out_dir: Path) -> list[dict]:
    """[{epoch, train_s (cumulative training seconds), ap50, ema_ap50?}] of a run directory: AP50
    from log.txt's test_coco_eval_bbox (epochs without an evaluation are left out)."""
    console = (out_dir / "console.txt").read_text() if (out_dir / "console.txt").exists() else ""
    seconds, total = {}, 0.0
    for epoch, spent in epoch_seconds(console).items():
        total += spent
        seconds[epoch] = total
    log = out_dir / "log.txt"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    curve = []
    for row in rows:
        if "test_coco_eval_bbox" not in row or row["epoch"] not in seconds:
            continue
        point = {"epoch": row["epoch"], "train_s": round(seconds[row["epoch"]], 2),
                 "ap50": row["test_coco_eval_bbox"][1]}
        if "test_ema_coco_eval_bbox" in row:
            point["ema_ap50"] = row["test_ema_coco_eval_bbox"][1]
        curve.append(point)
    return curve


def at_budget(curve: list[dict], budget: float, key: str = "ap50") -> float:
    """`key` of the last evaluation within `budget` training seconds (0.0 when there is none)."""
    within = [p[key] for p in curve if p["train_s"] <= budget and key in p]
    return max(within[-1], 0.0) if within else 0.0


def run_main(flags: list[str], out_dir: Path, budget: float | None) -> None:
    """main.py with `flags` into out_dir (console.txt beside log.txt), stopped once its training time
    passes `budget` seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "main.py"), *flags, "--output_dir", str(out_dir), "--overwrite"]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command[1:])}", flush=True)
    console = out_dir / "console.txt"
    with console.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ)
        while process.poll() is None:
            time.sleep(1.0)
            if budget is not None and sum(epoch_seconds(console.read_text()).values()) > budget:
                process.terminate()
                process.wait()
                print(f"  stopped: training time passed the {budget:.0f} s budget", flush=True)
                return
    if process.returncode != 0:
        raise SystemExit(f"main.py failed (exit {process.returncode}); see {console}")


def base_checkpoint(args, seed: int) -> Path:
    """The detector the finetune scenario starts from: --base_checkpoint, or the README's fast recipe
    trained on the demo data for `seed` (once; reused when present)."""
    if args.base_checkpoint:
        path = Path(args.base_checkpoint)
        if not path.is_file():
            raise SystemExit(f"--base_checkpoint {path}: no such file; train the demo model first or drop the flag")
        return path
    out_dir = Path(args.out_root) / "finetune" / "base" / f"s{seed}"
    console = out_dir / "console.txt"
    if not (console.is_file() and "Training time" in console.read_text()):  # absent or interrupted: (re)train
        folder = data_folder(Path(args.data_root), "demo", BASE_DATA, seed, args.tiny)
        flags = [*MODEL.split(), *BASE_RECIPE.split(), *(TINY_MODEL.split() if args.tiny else []),
                 *data_flags(folder), "--seed", str(seed)]
        run_main(flags, out_dir, budget=None)
    return out_dir / "checkpoint.pth"


def run_scenario(args) -> dict:
    """Every (recipe, variant, seed) run of the scenario; returns {recipe: {variant: {seed: curve}}}."""
    scenario = args.scenario
    results: dict = {}
    for seed in args.seeds:
        base = base_checkpoint(args, seed) if scenario == "finetune" and not args.tabulate_only else None
        for recipe in args.recipes:
            flags_text = RECIPES[scenario][recipe]
            for variant in args.variants:
                split, spec = VARIANTS[scenario][variant]
                out_dir = Path(args.out_root) / scenario / recipe / variant / f"s{seed}"
                if needs_polygons(flags_text) and spec["style"].get("boxes_only"):
                    continue  # --copy_paste has nothing to cut along: the recipe does not apply
                if not args.tabulate_only:
                    folder = data_folder(Path(args.data_root), variant, spec, seed, args.tiny)
                    flags = [*MODEL.split(), *flags_text.split(), *(TINY_MODEL.split() if args.tiny else []),
                             *data_flags(folder), "--seed", str(seed)]
                    if base is not None:
                        flags += ["--finetune", str(base)]
                    run_main(flags, out_dir, args.budget)
                if (out_dir / "console.txt").exists():  # a run stopped before its first evaluation scores 0
                    results.setdefault(recipe, {}).setdefault(variant, {})[seed] = read_curve(out_dir)
    return results


def summarise(scenario: str, results: dict, budget: float) -> dict:
    """Per recipe: AP50 at the budget per variant (mean over seeds, and per seed), the mean over the
    held-out variants and the worst held-out variant (lowest seed-mean)."""
    summary = {}
    for recipe, variants in results.items():
        rows = {}
        for variant, seeds in variants.items():
            scores = [at_budget(curve, budget) for curve in seeds.values()]
            rows[variant] = {"split": VARIANTS[scenario][variant][0], "mean": statistics.mean(scores),
                             "per_seed": scores}
        held = {v: r["mean"] for v, r in rows.items() if r["split"] == "held_out"}
        summary[recipe] = {"variants": rows,
                           "held_out_mean": statistics.mean(held.values()) if held else None,
                           "held_out_worst": min(held.items(), key=lambda kv: kv[1]) if held else None}
    return summary


def table(scenario: str, summary: dict, budget: float) -> str:
    variants = [v for v in VARIANTS[scenario] if any(v in s["variants"] for s in summary.values())]
    head = " | ".join(f"{v} ({VARIANTS[scenario][v][0].replace('_', '-')})" for v in variants)
    lines = [f"AP50 at {budget:.0f} s of training ({scenario}; mean over seeds)", "",
             f"| recipe | {head} | held-out mean | worst held-out |",
             "| --- |" + " --- |" * (len(variants) + 2)]
    for recipe, s in summary.items():
        cells = [f"{s['variants'][v]['mean']:.3f}" if v in s["variants"] else "n/a" for v in variants]
        mean = f"{s['held_out_mean']:.3f}" if s["held_out_mean"] is not None else "-"
        worst = f"{s['held_out_worst'][1]:.3f} ({s['held_out_worst'][0]})" if s["held_out_worst"] else "-"
        lines.append(f"| {recipe} | {' | '.join(cells)} | {mean} | {worst} |")
    return "\n".join(lines)


def curve_table(scenario: str, results: dict, budget: float) -> str:
    """AP50 (mean over seeds) at a quarter, half, three quarters and all of the budget, per run kind."""
    fractions = (0.25, 0.5, 0.75, 1.0)
    lines = [f"AP50 over training time ({scenario}; mean over seeds)", "",
             "| recipe | variant | " + " | ".join(f"{f * budget:.0f} s" for f in fractions) + " |",
             "| --- | --- |" + " --- |" * len(fractions)]
    for recipe, variants in results.items():
        for variant, seeds in variants.items():
            cells = [f"{statistics.mean(at_budget(c, f * budget) for c in seeds.values()):.3f}" for f in fractions]
            lines.append(f"| {recipe} | {variant} | {' | '.join(cells)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=list(RECIPES), default="scratch")
    parser.add_argument("--recipes", nargs="+", help="recipes to run (default: all of the scenario's)")
    parser.add_argument("--variants", nargs="+", help="data variants (default: all of the scenario's; "
                                                      "--tiny: one tune and one held-out)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training and data seeds")
    parser.add_argument("--budget", type=float, default=1350.0, help="training seconds per run")
    parser.add_argument("--base_checkpoint", help="finetune: the trained demo detector to start from")
    parser.add_argument("--data_root", default="data/convergence", help="generated variants go here")
    parser.add_argument("--out_root", default="outputs/convergence", help="one run directory per run")
    parser.add_argument("--tabulate_only", action="store_true", help="only read the runs already made")
    parser.add_argument("--tiny", action="store_true", help="tiny model and data, 2 epochs: checks the harness")
    args = parser.parse_args(argv)
    args.recipes = args.recipes or list(RECIPES[args.scenario])
    args.variants = args.variants or (TINY_VARIANTS[args.scenario] if args.tiny else list(VARIANTS[args.scenario]))
    for kind, names, known in (("recipe", args.recipes, RECIPES[args.scenario]),
                               ("variant", args.variants, VARIANTS[args.scenario])):
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"--{kind}s {' '.join(unknown)}: not a {args.scenario} {kind}; "
                         f"choose among {', '.join(known)}")
    if args.budget <= 0:
        parser.error(f"--budget {args.budget}: must be > 0 seconds")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run_scenario(args)
    if not results:
        raise SystemExit(f"no runs under {Path(args.out_root) / args.scenario}")
    summary = summarise(args.scenario, results, args.budget)
    print(curve_table(args.scenario, results, args.budget) + "\n")
    print(table(args.scenario, summary, args.budget))
    report = {"scenario": args.scenario, "budget_s": args.budget, "seeds": args.seeds, "summary": summary,
              "runs": results, "recipes": {r: RECIPES[args.scenario][r] for r in results}}
    out = Path(args.out_root) / f"{args.scenario}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
