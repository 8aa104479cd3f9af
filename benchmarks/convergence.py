"""Learning curves of the README's two shapes recipes, run one after the other, side by side.

    python benchmarks/convergence.py                      # both recipes, ~35 min on 2 CPU cores
    python benchmarks/convergence.py --tabulate_only      # print the table of runs already made
    python benchmarks/convergence.py --data_path D --seed 1 --out_root runs/conv_s1

Each recipe is the README's command (RECIPES below; tests/test_readme.py keeps them equal) with
--data_path/--output_dir/--seed added. The runs never overlap: two trainings at once on 2 cores
run ~15x slower each. Printed: AP50 (and AP) on the validation images after every epoch for
both recipes (for the fast recipe also its EMA weights), seconds per training epoch (median),
and when the fast recipe first reaches the plain recipe's final AP50, in epochs and in seconds
of training. A JSON with every number goes to OUT_ROOT/convergence.json.
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

COMMON = ("--dataset_file shapes --device cpu --backbone resnet18 --backbone_weights none --hidden_dim 128 "
          "--enc_layers 2 --dec_layers 2 --dim_feedforward 256 --num_queries 10 --dropout 0")
DATA = "--augment flip --image_scale 0.16 --shapes_train_size 512 --batch_size 4"
RECIPES = {
    "plain": f"{COMMON} --lr_backbone 1e-4 {DATA} --epochs 24 --lr_drop 18 --print_freq 128 --output_dir outputs/demo",
    "fast": f"{COMMON} --lr 2e-4 --lr_backbone 2e-4 {DATA} --epochs 12 --lr_drop 10 --group_detr 20 --ema 0.995 "
            "--copy_paste 3 --set_cost_class 2 --eos_coef 0.3 --print_freq 128 --output_dir outputs/demo_fast",
}


def recipe_flags(name: str, data_path: str, out_dir: Path, seed: int) -> list[str]:
    flags = RECIPES[name].split()
    i = flags.index("--output_dir")
    flags[i + 1] = str(out_dir)
    return [*flags, "--data_path", data_path, "--seed", str(seed)]


def read_run(out_dir: Path) -> dict:
    """Per-epoch AP/AP50 (raw and EMA) from log.txt and seconds per epoch from the console log."""
    rows = [json.loads(line) for line in (out_dir / "log.txt").read_text().splitlines() if line.strip()]
    console = (out_dir / "console.txt").read_text() if (out_dir / "console.txt").exists() else ""
    per_it = [float(s) for s in re.findall(r"Epoch: \[\d+\] Total time: \S+ \(([\d.]+) s / it\)", console)]
    iters = re.search(r"Epoch: \[\d+\]\s+\[\s*\d+/(\d+)\]", console)
    seconds = [t * int(iters.group(1)) for t in per_it] if iters else []
    run = {"ap50": [r["test_coco_eval_bbox"][1] for r in rows], "ap": [r["test_coco_eval_bbox"][0] for r in rows],
           "epoch_seconds": seconds}
    if rows and "test_ema_coco_eval_bbox" in rows[0]:
        run["ema_ap50"] = [r["test_ema_coco_eval_bbox"][1] for r in rows]
        run["ema_ap"] = [r["test_ema_coco_eval_bbox"][0] for r in rows]
    return run


def first_reaching(curve: list[float], target: float) -> int | None:
    """0-based epoch at which `curve` first reaches `target`, or None."""
    return next((i for i, v in enumerate(curve) if v >= target), None)


def table(runs: dict) -> str:
    plain, fast = runs.get("plain"), runs.get("fast")
    n = max(len(r["ap50"]) for r in runs.values())
    lines = ["| epoch | plain AP50 | fast AP50 | fast AP50 (EMA) |", "| --- | --- | --- | --- |"]

    def cell(run, key, i):
        return f"{run[key][i]:.3f}" if run and key in run and i < len(run[key]) else ""

    for i in range(n):
        lines.append(f"| {i} | {cell(plain, 'ap50', i)} | {cell(fast, 'ap50', i)} | {cell(fast, 'ema_ap50', i)} |")
    for name, run in runs.items():
        if run["epoch_seconds"]:
            med = statistics.median(run["epoch_seconds"])
            lines.append(f"\n{name}: {med:.0f} s per training epoch (median of {len(run['epoch_seconds'])}), "
                         f"final AP {run['ap'][-1]:.3f} AP50 {run['ap50'][-1]:.3f}")
    if plain and fast and plain["ap50"]:
        target = plain["ap50"][-1]
        for key in ("ap50", "ema_ap50"):
            if key in fast:
                hit = first_reaching(fast[key], target)
                where = "never" if hit is None else f"after epoch {hit} ({hit + 1} epochs"
                if hit is not None and fast["epoch_seconds"]:
                    where += f", {sum(fast['epoch_seconds'][:hit + 1]):.0f} s of training"
                where += ")" if hit is not None else ""
                lines.append(f"fast ({key}) reaches the plain recipe's final AP50 {target:.3f}: {where}")
        if plain["epoch_seconds"]:
            lines.append(f"plain recipe: {sum(plain['epoch_seconds']):.0f} s of training for {len(plain['ap50'])} epochs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--data_path", default="data/shapes", help="shapes data (generated on first use)")
    parser.add_argument("--out_root", default="outputs/convergence", help="one run directory per recipe")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--tabulate_only", action="store_true", help="print the table of existing runs")
    args = parser.parse_args()
    out_root = Path(args.out_root)
    runs = {}
    for name in args.recipes:
        out_dir = out_root / name
        if not args.tabulate_only:
            out_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / "main.py"), *recipe_flags(name, args.data_path, out_dir, args.seed)]
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
            with (out_dir / "console.txt").open("w") as console:
                subprocess.run(cmd, check=True, stdout=console, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ)
        if (out_dir / "log.txt").exists():
            runs[name] = read_run(out_dir)
    if not runs:
        raise SystemExit(f"no runs under {out_root}")
    print(table(runs))
    (out_root / "convergence.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
