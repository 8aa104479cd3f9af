"""Convert an existing run's log.txt (one JSON object per epoch) into TensorBoard event files.

    python tools/log_to_tensorboard.py RUN_DIR_OR_LOG_TXT [--out DIR]

The output defaults to RUN_DIR/tensorboard, the folder main.py writes to; view with
`tensorboard --logdir RUN_DIR/tensorboard`. The step is each line's `epoch` (its line number
when absent). Lines that are not JSON objects are skipped with a warning.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import HelpFormatter, exit_on_user_error  # noqa: E402
from util.tensorboard import TensorboardWriter  # noqa: E402


def convert(log_file: str | Path, out_dir: str | Path) -> int:
    """Write one step per line of `log_file` to `out_dir`; returns the number of steps written."""
    log_file = Path(log_file)
    if log_file.is_dir():
        log_file = log_file / "log.txt"
    if not log_file.is_file():
        raise FileNotFoundError(f"{log_file} does not exist; pass a run directory holding log.txt or the file itself")
    writer = TensorboardWriter(out_dir)
    written = 0
    for number, line in enumerate(log_file.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            stats = json.loads(line)
        except json.JSONDecodeError as err:
            print(f"warning: {log_file} line {number + 1} is not JSON ({err}); skipped", file=sys.stderr)
            continue
        if not isinstance(stats, dict):
            print(f"warning: {log_file} line {number + 1} is not a JSON object; skipped", file=sys.stderr)
            continue
        step = stats.pop("epoch", number)
        writer.add_scalars(stats, step=int(step))
        written += 1
    writer.close()
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("log", help="run directory (with log.txt) or a log.txt file")
    parser.add_argument("--out", default=None, help="event file folder (default: RUN_DIR/tensorboard)")
    args = parser.parse_args(argv)
    log = Path(args.log)
    out = Path(args.out) if args.out else (log if log.is_dir() else log.parent) / "tensorboard"
    steps = convert(log, out)
    print(f"wrote {steps} epoch(s) of scalars to {out}")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
