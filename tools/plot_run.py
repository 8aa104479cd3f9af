"""Plot a training run directory to PNG files.

    python tools/plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR] [--fields class_error loss_bbox_unscaled mAP]

Writes OUT/curves.png (log.txt curves of every run, smoothed with --ewm) and, when the runs have
eval/*.pth files, OUT/precision_recall.png. OUT defaults to the first RUN_DIR/plots.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import HelpFormatter, exit_on_user_error  # noqa: E402
from util.plot_utils import plot_logs, plot_precision_recall  # noqa: E402


def plot_run(run_dirs: list[Path], out_dir: Path, fields: list[str], ewm: float = 0) -> list[Path]:
    """Write the PNGs for `run_dirs` into `out_dir`; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "curves.png"]
    plot_logs(run_dirs, fields=fields, ewm_col=ewm, out_file=written[0])
    evals = []
    for run in run_dirs:
        files = sorted((run / "eval").glob("*.pth"))
        numbered = [f for f in files if f.stem != "latest"]
        evals += numbered or files  # latest.pth duplicates the last numbered one when both exist
    if evals:
        written.append(out_dir / "precision_recall.png")
        naming = "exp_id" if len(run_dirs) > 1 else "iter"
        plot_precision_recall(evals, naming_scheme=naming, out_file=written[1])
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (--output_dir of main.py)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the PNGs (default: the first RUN_DIR/plots)")
    parser.add_argument("--fields", nargs="+", default=["class_error", "loss_bbox_unscaled", "mAP"],
                        help="log.txt stats to plot (train and test curves each; mAP = COCO AP)")
    parser.add_argument("--ewm", type=float, default=0, help="smoothing: pandas ewm centre of mass (0 = none)")
    args = parser.parse_args(argv)
    for path in plot_run(args.runs, args.out or args.runs[0] / "plots", args.fields, args.ewm):
        print(f"wrote {path}")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
