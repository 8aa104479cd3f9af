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

Interrupts end in one line too: Ctrl-C (SIGINT) exits 130 and SIGTERM 143 (128 + the signal),
saying the epoch that was running (`note_epoch`), that the last saved checkpoint is intact and
`--resume auto` to continue. Within `exit_on_user_error` SIGTERM raises `Terminated`, a
KeyboardInterrupt, so the same clean-up runs (a checkpoint being written is abandoned, its
temporary file removed); a SIGTERM handler someone else installed (submitit) is left alone.

Set DETR_TRACEBACK=1 to get the full traceback for every error.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from util.checkpoint import CHECKPOINT_NAME, CheckpointError, find_in_chain

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, like Ctrl-C's KeyboardInterrupt."""


# The training epoch now running and the run's folder, for the report of an interrupt.
_progress: dict[str, object] = {}


def note_epoch(epoch: int, output_dir: str | os.PathLike | None) -> None:
    """Record that training epoch `epoch` runs, saving into `output_dir` (None: nothing is saved)."""
    _progress.update(epoch=epoch, output_dir=Path(output_dir) if output_dir else None)


def interrupt_message(err: KeyboardInterrupt) -> str:
    """One line: which signal, the epoch it stopped, and how the run continues."""
    what = "stopped by SIGTERM" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"
    if "epoch" not in _progress:
        return what
    what += f" in epoch {_progress['epoch']}"
    output_dir = _progress["output_dir"]
    if output_dir is None:
        return f"{what}; nothing is saved without --output_dir"
    checkpoint = Path(output_dir) / CHECKPOINT_NAME
    if checkpoint.is_file():
        return f"{what}; the last saved checkpoint {checkpoint} is intact: continue with --resume auto"
    return f"{what}; no checkpoint saved in {output_dir} yet: run the command again with --resume auto"


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated inside the block (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _quiet_lost_connections(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """sys.excepthook while an interrupted run shuts down: multiprocessing's fd-sharing thread calls
    it when a DataLoader worker dies mid-handshake; that broken connection is the interrupt's doing."""
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, value, tb)


def _exit_interrupted(err: KeyboardInterrupt) -> None:
    print(f"error: {interrupt_message(err)}", file=sys.stderr, flush=True)
    sys.excepthook = _quiet_lost_connections
    if threading.current_thread() is threading.main_thread():
        # DataLoader workers got the signal too; torch's SIGCHLD handler would report each one's
        # end as a failure while the loaders shut down.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sys.exit(128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT))


@contextlib.contextmanager
def exit_on_user_error(*always: type[BaseException]) -> Iterator[None]:
    """Run the body; a user error (see the module doc) prints `error: <message>` and exits 2,
    an interrupt prints one line and exits 130 (Ctrl-C) or 143 (SIGTERM).

    `always`: exception types that are user errors wherever they are raised.
    """
    _progress.clear()
    verbose = bool(os.environ.get("DETR_TRACEBACK"))
    try:
        with _sigterm_raises():
            yield
    except KeyboardInterrupt as err:
        if verbose:
            raise
        _exit_interrupted(err)
    except (Exception, SystemExit) as err:
        interrupt = find_in_chain(err, KeyboardInterrupt)  # a library turned the interrupt into its own error
        if interrupt is not None and not verbose:
            _exit_interrupted(interrupt)
        message = None if verbose else user_error_message(err, always)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
