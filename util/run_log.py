"""log.txt of a training run: one JSON object per line, one line per finished epoch.

- `append_log_line(output_dir, stats)`: the line and its newline in one write, flushed and
  fsynced, so a kill leaves either the whole line or a cut last line without its newline; a
  failed write (disk full) is undone where the file allows it and reported naming log.txt.
- `prepare_log(output_dir, start_epoch)`: before training, drop a cut last line (said in one
  line) and the lines of epochs >= start_epoch (written by a run stopped before the epoch's
  checkpoint, which the resumed run trains again). Any other line that is not a JSON object is
  an error naming log.txt and the line number; nothing is rewritten then.
- `read_log(path)`: the entries, for tools that read a run back.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from util.checkpoint import describe_os_error

LOG_NAME = "log.txt"


@dataclass
class _Parsed:
    lines: list[str] = field(default_factory=list)  # the raw text of each complete line, no newline
    entries: list[dict[str, Any]] = field(default_factory=list)
    cut: str | None = None  # a last line that a kill cut short (no newline, not JSON)


def _parse(path: Path) -> _Parsed:
    text = path.read_bytes().decode("utf-8", errors="replace")
    parsed = _Parsed()
    raw_lines = text.split("\n")
    ends_with_newline = raw_lines[-1] == ""
    if ends_with_newline:
        raw_lines.pop()
    for number, line in enumerate(raw_lines, start=1):
        if not line.strip():
            continue
        last_and_open = number == len(raw_lines) and not ends_with_newline
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            if last_and_open:
                parsed.cut = line
                break
            raise ValueError(f"{path} line {number} is not JSON ({err.msg}, column {err.colno}): "
                             f"{line[:60]!r}; correct or delete that line, then run again") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path} line {number} is a JSON {type(entry).__name__}, not an object "
                             f"with one epoch's stats: {line[:60]!r}; correct or delete that line, then run again")
        parsed.lines.append(line)
        parsed.entries.append(entry)
    return parsed


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of log.txt in order, without a cut last line; ValueError for any other bad line."""
    return _parse(Path(path)).entries


def _replace_text(path: Path, text: str) -> None:
    """Rewrite `path` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prepare_log(output_dir: str | os.PathLike, start_epoch: int) -> None:
    """Make OUTPUT/log.txt hold only the epochs before `start_epoch` (see the module doc)."""
    path = Path(output_dir) / LOG_NAME
    if not path.is_file():
        return
    parsed = _parse(path)
    kept = [line for line, entry in zip(parsed.lines, parsed.entries) if entry.get("epoch", -1) < start_epoch]
    dropped_epochs = [entry["epoch"] for entry in parsed.entries if entry.get("epoch", -1) >= start_epoch]
    if parsed.cut is not None:
        print(f"{path}: dropped its last line, cut short by a run stopped while writing it "
              f"({len(parsed.cut)} characters)")
    if dropped_epochs:
        print(f"{path}: dropped the lines of epochs {', '.join(map(str, dropped_epochs))}; "
              f"training continues at epoch {start_epoch}")
    if parsed.cut is not None or dropped_epochs:
        _replace_text(path, "".join(line + "\n" for line in kept))


def append_log_line(output_dir: str | os.PathLike, stats: dict[str, Any]) -> None:
    """Append `stats` as one JSON line to OUTPUT/log.txt, on disk when this returns.

    A write that fails part-way (disk full) is cut back to the previous end of the file, so the
    next run finds no partial line; the OSError raised names log.txt and how to continue.
    """
    path = Path(output_dir) / LOG_NAME
    data = (json.dumps(stats) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError as err:
            try:
                os.ftruncate(fd, end)
            except OSError:
                pass  # the cut line stays; prepare_log drops it on resume
            raise OSError(f"could not append epoch {stats.get('epoch', '?')}'s line to {path}: "
                          f"{describe_os_error(err, path.parent)}. The last checkpoint is intact: "
                          "continue with --resume auto") from err
    finally:
        os.close(fd)
