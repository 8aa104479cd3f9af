"""argparse `type=` checks for numeric flags: a value out of range is refused while the command line
is parsed (before any work), naming the allowed range; `parse_flags` turns that into one line."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _ranged(kind: type, low: float, high: float | None = None, *, low_open: bool = False,
            high_open: bool = True) -> Callable[[str], int | float]:
    """A `type=` function: the text as `kind`, refused unless finite and within the bounds."""
    low_text = f"> {low}" if low_open else f">= {low}"
    allowed = (f"{low_text} and {'<' if high_open else '<='} {high}" if high is not None else low_text)
    name = "an integer" if kind is int else "a number"

    def check(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {name} {allowed}, got {text}") from None
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {name} {allowed}, got {text}")
        return value

    return check


positive_int = _ranged(int, 1)
non_negative_int = _ranged(int, 0)
positive_float = _ranged(float, 0, low_open=True)
non_negative_float = _ranged(float, 0)
probability = _ranged(float, 0, 1)  # [0, 1): dropout rates, EMA decay, score thresholds
unit_interval = _ranged(float, 0, 1, high_open=False)  # [0, 1]: probabilities of an augmentation


def parse_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, a refused value raised as SystemExit with one line
    ('argument --batch_size: must be an integer >= 1, got 0') for util.cli.exit_on_user_error."""
    parser.exit_on_error = False
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise SystemExit(str(err)) from None
