"""Conventions of the command-line entry points (main.py, predict.py, run_with_submitit.py, tools/).

`HelpFormatter`: --help shows each flag's default and keeps the description's line breaks.

`exit_on_user_error`: a user's mistake is reported as one line `error: <message>` on stderr with
exit status 2 (argparse's status for bad usage); the traceback is kept for real bugs.

What counts as a user error:
- CheckpointError, and any type the entry point names (main.py adds NonFiniteLossError): their
  messages name the file or epoch and the fix;
- ValueError and OSError (missing file, bad JSON, bad flag combination, no CUDA) raised by the
  project's own code, which raises them where a bad value enters and names it; the same types
  raised inside a library (torch, numpy, PIL, ...) are bugs until shown otherwise and keep their
  traceback. Errors re-raised from a DataLoader worker are judged by where the worker raised them.
- SystemExit carrying a message (`raise SystemExit("...")`).

Set DETR_TRACEBACK=1 to get the full traceback for every error.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from util.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults after each flag's help; the description printed as written.

    Switches (--masks, --no_aux_loss) and unset (None) defaults show none: "default: False" says
    nothing, and for --no_aux_loss the stored default (True) would read as the switch being on.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default is None:
            return action.help or ""
        if action.default == "":
            return f"{action.help} (default: empty)"
        return super()._get_help_string(action)


_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _raise_site(err: BaseException) -> tuple[str, str]:
    """(file of the frame that raised `err`, its message without worker traceback text)."""
    text = str(err)
    if _WORKER_ERROR.match(text):
        files = re.findall(r'^  File "(.+?)", line \d+', text, flags=re.M)
        starts = list(re.finditer(rf"^{re.escape(type(err).__name__)}: ", text, flags=re.M))
        if files and starts:
            return files[-1], text[starts[-1].end():].strip()
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (tb.tb_frame.f_code.co_filename if tb is not None else ""), text


def _is_project_file(filename: str) -> bool:
    path = Path(filename).resolve()
    return path.is_relative_to(ROOT) and not {"site-packages", "dist-packages"} & set(path.parts)


def user_error_message(err: BaseException, always: tuple[type[BaseException], ...] = ()) -> str | None:
    """The one-line report for `err` if it is a user error (see the module doc), else None."""
    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, str) else None
    filename, message = _raise_site(err)
    if isinstance(err, (CheckpointError, *always)):
        return message
    if isinstance(err, (ValueError, OSError)) and _is_project_file(filename):
        return message
    return None


@contextlib.contextmanager
def exit_on_user_error(*always: type[BaseException]) -> Iterator[None]:
    """Run the body; a user error (see the module doc) prints `error: <message>` and exits 2.

    `always`: exception types that are user errors wherever they are raised.
    """
    try:
        yield
    except (Exception, SystemExit) as err:
        message = None if os.environ.get("DETR_TRACEBACK") else user_error_message(err, always)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
