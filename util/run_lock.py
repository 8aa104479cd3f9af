"""One run per output folder: an exclusive lock on OUTPUT/.run.lock, held for the process's life.

`lock_run_folder(output_dir)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on OUTPUT/.run.lock and
writes the holder (pid, host, start time, command, Slurm job id) into it. A second run into the
same folder is refused at once with RunFolderInUse naming the folder and that holder; the
first run is not touched. The kernel drops the lock when the holder exits, however it exits
(SIGKILL included), so a killed run never blocks the next one; the file itself stays.

- Distributed runs: only the main process (rank 0) locks.
- Slurm requeue: the same job id comes back after its old processes ended; should the lock still
  be held by that job (a shared filesystem that frees it late), the new start waits for it.
- Filesystems without locks (some NFS mounts): a one-line note, and the run goes on unlocked.
- Several main() calls in one process (tests, notebooks) share the process's lock on a folder;
  forked children (DataLoader workers) do not keep it.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".run.lock"
SAME_JOB_WAIT_S = 120.0  # how long a requeued Slurm job waits for its earlier start's lock
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

_held: dict[Path, int] = {}  # folder (resolved) -> open descriptor holding its lock


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copy of the descriptor: the lock must go
    when the run's process dies, not when its last worker notices."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunFolderInUse(OSError):
    """Another process holds the output folder's lock; the message names the folder and it."""


def _holder_record() -> dict[str, object]:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def _write_record(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder_record()) + "\n").encode(), 0)


def _read_record(path: Path) -> dict[str, object]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # being written right now, or not ours
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict[str, object]) -> str:
    if not record:
        return "another process (its details are not written yet)"
    command = str(record.get("command", ""))
    command = command if len(command) <= 100 else command[:97] + "..."
    return (f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"
            + (f": {command}" if command else ""))


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_run_folder(output_dir: str | os.PathLike, same_job_wait_s: float = SAME_JOB_WAIT_S) -> bool:
    """Hold OUTPUT/.run.lock for the rest of this process; True when held, False where the
    filesystem has no locks (noted in one line). Raises RunFolderInUse if another process has it.
    """
    folder = Path(output_dir).resolve()
    if folder in _held:
        _write_record(_held[folder])
        return True
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OSError(f"cannot create the run lock {path}: {err.strerror}; make --output_dir writable") from err
    try:
        deadline = None
        while not _try_lock(fd):
            record = _read_record(path)
            job = os.environ.get("SLURM_JOB_ID")
            if job and record.get("slurm_job_id") == job and same_job_wait_s > 0:
                if deadline is None:  # an earlier start of this very job (requeue) is still going away
                    print(f"{path}: held by an earlier start of Slurm job {job} ({_describe(record)}); "
                          f"waiting up to {same_job_wait_s:.0f} s for it to end", flush=True)
                    deadline = time.monotonic() + same_job_wait_s
                if time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
            raise RunFolderInUse(
                f"--output_dir {output_dir} is in use by another run ({_describe(record)}); wait for it to end "
                f"or give another --output_dir (if that process is gone, e.g. its node crashed, delete {path})")
    except OSError as err:
        os.close(fd)
        if isinstance(err, RunFolderInUse) or err.errno not in _NO_LOCKS:
            raise
        print(f"note: {path}: this filesystem does not support file locks ({err.strerror}); nothing stops "
              "a second run from using this folder at the same time")
        return False
    _write_record(fd)
    _held[folder] = fd
    return True


def unlock_run_folder(output_dir: str | os.PathLike) -> None:
    """Release this process's lock on `output_dir` (it also goes when the process ends)."""
    fd = _held.pop(Path(output_dir).resolve(), None)
    if fd is not None:
        os.close(fd)
