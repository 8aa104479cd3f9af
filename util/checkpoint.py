"""Checkpoint files: kill-safe saving, loading that never runs code, clear mismatch errors.

- `save_checkpoint(obj, path)`: main process only; the file at `path` is always either the old
  complete checkpoint or the new complete one (temporary file in the same directory, fsync,
  atomic rename), even if the process is killed or the disk fills up mid-write.
- `load_checkpoint(path_or_url)`: `torch.load(weights_only=True)` with an allow-list that covers
  the original's `args` Namespace; https/file URLs go through the torch hub cache with the
  sha256 prefix of the file name checked. Anything that would need arbitrary code is refused.
- `resume_source(resume, output_dir)`: `--resume auto` -> the folder's checkpoint.pth or a
  fresh start; a fresh run into a folder holding a checkpoint is refused (unless --overwrite).
- `load_model_state(model, state_dict)`: strict loading whose error lists what differs.
- `capture_rng_state()` / `restore_rng_state(d)`: every RNG a resume needs, as tensors and plain
  types, so a checkpoint holding them still loads with `weights_only=True`.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import pathlib
import pickle
import random
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any, Iterator
from urllib.error import URLError
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
import torch.distributed as dist
from torch.hub import HASH_REGEX

from util.finetune import adapt_for_finetune  # noqa: F401  (docs/internals.md lists it here)

# Classes a DETR checkpoint may hold besides tensors and plain containers: the run's `args`
# (argparse.Namespace, as in the original) and paths, should a caller's args carry them.
SAFE_GLOBALS: list[type] = [
    argparse.Namespace,
    pathlib.Path,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
]

CHECKPOINT_NAME = "checkpoint.pth"
_TMP_MARK = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, read or applied; the message names the file and the fix."""


@contextlib.contextmanager
def safe_globals() -> Iterator[None]:
    """Within this block, `torch.load(weights_only=True)` also accepts the classes of SAFE_GLOBALS."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        yield


# ---------------------------------------------------------------------------------------------
# Saving


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _temp_prefix(target: Path) -> str:
    # Hidden, and never named *.pth, so neither find_resumable nor a glob for checkpoints sees it.
    return f".{target.name}{_TMP_MARK}"


def _writer_is_alive(temp_file: Path, prefix: str) -> bool:
    """Whether the process named in `temp_file` (`<prefix><pid>-<random>`) still runs on this host."""
    pid = temp_file.name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by another user
        return True
    return True


def _remove_stale_temp_files(target: Path) -> None:
    """Delete temporary files left by an earlier process killed while writing `target`.

    One training run holds a folder (util/run_lock.py) and only its main process saves; a file
    whose writer still runs on this host (two `--eval` writing eval.pth at once) is left to it.
    """
    prefix = _temp_prefix(target)
    for stale in target.parent.glob(prefix + "*"):
        if not _writer_is_alive(stale, prefix):
            with contextlib.suppress(OSError):
                stale.unlink()


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{max(1, n_bytes // 1024)} KiB"


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def describe_os_error(err: OSError, directory: Path | None = None, needed: int | None = None) -> str:
    """A failed write in words a user can act on: disk full (where, how much), quota, permissions.

    `directory`: where the write went; `needed`: bytes it would have taken (to say what to free).
    """
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device (disk full" if err.errno == errno.ENOSPC else "disk quota exceeded ("
        where = f" at {directory}" if directory is not None else ""
        room = ""
        if needed is not None and directory is not None:
            free = _free_bytes(directory)
            room = f": about {_size(needed)} needed" + (f", {_size(free)} free" if free is not None else "")
        return f"{what}{where}{room}); free space or choose another --output_dir"
    if err.errno == errno.EFBIG:
        return "file too large (the process's file size limit, ulimit -f, or the filesystem's)"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({err.strerror}); make the directory writable or choose another --output_dir"
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"the directory does not exist ({err.strerror}); create it or choose another --output_dir"
    return f"{type(err).__name__}: {err}"


def _tensor_bytes(obj: Any) -> int:
    """Bytes of tensor data in `obj` (nested dicts, lists, tuples): about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def find_in_chain(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`err` or the first of its causes/contexts that is a `kind` (torch.save wraps a failed
    write, or a Ctrl-C inside it, in a RuntimeError about the stream position)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `obj` with torch.save to `path` atomically; other processes of a distributed run return.

    The file at `path` is replaced only once the new content is complete and on disk. On any
    failure the temporary file is removed, the previous checkpoint stays as it was, and a
    CheckpointError naming the path and the cause (disk full: where, about how much space is
    needed) is raised. An interrupt (Ctrl-C, SIGTERM) during the write is re-raised as itself.
    """
    if not _is_main_process():
        return
    target = Path(path)
    _remove_stale_temp_files(target)
    tmp = target.parent / f"{_temp_prefix(target)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:  # also KeyboardInterrupt: never leave a half-written temp file
        with contextlib.suppress(OSError):
            tmp.unlink()
        interrupt = find_in_chain(err, KeyboardInterrupt)
        if interrupt is not None and interrupt is not err:
            raise interrupt from None
        if not isinstance(err, Exception):
            raise
        needed = _tensor_bytes(obj)
        os_error = find_in_chain(err, OSError)
        free = _free_bytes(target.parent)
        if os_error is None and free is not None and free < needed:  # a stream error that lost its errno
            os_error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if isinstance(os_error, OSError):
            cause = describe_os_error(os_error, target.parent, needed)
            how_on = "; a training run continues from it with --resume auto"
        else:
            cause, how_on = f"{type(err).__name__}: {err}", ""
        raise CheckpointError(f"could not save checkpoint {target}: {cause}. "
                              f"The previous checkpoint, if any, is left intact{how_on}") from err
    _fsync_directory(target.parent)


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create `directory` if needed and prove it takes files; raise CheckpointError otherwise.

    Meant for the start of a run, so a bad --output_dir fails before any training time is spent.
    """
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"output directory {out} cannot be used: {describe_os_error(err)}") from err
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def _check_hash_prefix(path: Path, name: str) -> None:
    """Like torch.hub's check_hash: a `-<hex>.` part of the file name must start its sha256."""
    found = HASH_REGEX.search(path.name)
    if not found:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(found.group(1)):
        raise CheckpointError(
            f"checkpoint {name} does not match the sha256 prefix in its name ({found.group(1)}); "
            "the file is corrupt or was replaced"
        )


def _refusal(name: str, err: Exception) -> CheckpointError:
    """Turn torch's weights-only error into one naming the file and the offending global."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    needs = f" (it needs {found.group(1)})" if found else ""
    return CheckpointError(
        f"refusing to load {name}: it is not a plain-weights checkpoint{needs}. Loading it would "
        "run code stored in the file, so nothing from it was executed. Only load files from a "
        "source you trust; re-save trusted weights as a dict of tensors (and an argparse.Namespace 'args')."
    )


def _classify_load_error(name: str, err: Exception) -> CheckpointError:
    message = str(err)
    # torch's weights-only unpickler stops at the first thing that is not data (a global, a
    # call, an unknown opcode) before running it: the file is refused, not "corrupt".
    if "Weights only load failed" in message:
        return _refusal(name, err)
    return CheckpointError(
        f"cannot read checkpoint {name}: the file is truncated or corrupt ({type(err).__name__}: "
        f"{message.splitlines()[0] if message else 'no detail'}). Use an earlier checkpoint "
        "(checkpointNNNN.pth) or copy the file again."
    )


def _as_checkpoint_dict(name: str, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {name} holds a {type(obj).__name__}, not a dict; expected a dict with a "
            "'model' state dict (or a bare state dict)"
        )
    if "model" in obj:
        return obj
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return {"model": obj}  # a bare state dict, as some exports and hub files are
    raise CheckpointError(
        f"checkpoint {name} has no 'model' entry (keys: {sorted(map(str, obj))[:10]}); expected a "
        "training checkpoint or a bare state dict of tensors"
    )


def load_checkpoint(path_or_url: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint without executing code from it.

    In: a local path, a file:// URL, or an http(s) URL (downloaded once into the torch hub
    cache). For URLs a `-<hex>.` part of the file name is checked against its sha256. Out: a dict with at least
    'model' (a bare state dict comes back as {'model': sd}); training checkpoints also carry
    'optimizer', 'lr_scheduler', 'epoch', 'args' and possibly 'rng_state'.
    Raises CheckpointError naming the file for: missing, truncated/corrupt, hash mismatch, or
    content that needs arbitrary code (refused before any of it runs).
    """
    name = str(path_or_url)
    if name.startswith(("http://", "https://")):
        obj = _load_url(name, map_location)
    else:
        # file:// URLs are read in place: a copy in the hub cache, keyed by file name only,
        # could be a stale file of the same name from another run.
        path = Path(url2pathname(urlparse(name).path)) if name.startswith("file://") else Path(name)
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {name} does not exist" + (" (it is a directory)" if path.is_dir() else "")
                + "; check the path given to --resume / --finetune / --frozen_weights"
            )
        if name.startswith("file://"):
            _check_hash_prefix(path, name)
        try:
            with safe_globals():
                obj = torch.load(path, map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError,
                IndexError, KeyError, TypeError, zipfile.BadZipFile) as err:
            raise _classify_load_error(name, err) from err
    return _as_checkpoint_dict(name, obj)


def _load_url(url: str, map_location: Any) -> Any:
    try:
        with safe_globals():
            return torch.hub.load_state_dict_from_url(
                url, map_location=map_location, check_hash=True, weights_only=True
            )
    except (URLError, ConnectionError, TimeoutError, FileNotFoundError) as err:
        raise CheckpointError(
            f"cannot download checkpoint {url}: {err}. Download it by other means and pass the local path"
        ) from err
    except RuntimeError as err:
        if "invalid hash value" in str(err):
            raise CheckpointError(
                f"checkpoint {url} does not match the sha256 prefix in its name; the download is corrupt "
                "or the file was replaced. Delete it from the torch hub cache (torch.hub.get_dir()/checkpoints) "
                "and download again"
            ) from err
        raise _classify_load_error(url, err) from err
    except (pickle.UnpicklingError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise _classify_load_error(url, err) from err


def find_resumable(output_dir: str | os.PathLike) -> Path | None:
    """Path of `output_dir/checkpoint.pth` if there is one to resume from, else None.

    Temporary files of an interrupted write are never returned. A checkpoint.pth that exists but
    is not a complete file (damaged outside this program: atomic saves cannot leave one) raises
    CheckpointError rather than silently restarting the run from scratch.
    """
    path = Path(output_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} exists but is not a complete checkpoint; move it away to start afresh, "
            "or resume from an earlier checkpointNNNN.pth with --resume"
        )
    return path


RESUME_AUTO = "auto"


def resume_source(resume: str, output_dir: str | os.PathLike | None, *, overwrite: bool = False,
                  training: bool = True) -> str:
    """What --resume means for this run: a checkpoint path/URL, or "" for a fresh start.

    `--resume auto` -> output_dir's checkpoint.pth when find_resumable finds one, else "" (so
    `torchrun --max_restarts N ... --resume auto` restarts every rank from the last epoch).
    A fresh training run (no --resume) in a folder that already holds a checkpoint would
    overwrite it after one epoch: refused with CheckpointError unless `overwrite`.
    """
    if resume == RESUME_AUTO:
        if output_dir is None:
            raise CheckpointError("--resume auto resumes from --output_dir's checkpoint.pth: give --output_dir")
        found = find_resumable(output_dir)
        return str(found) if found is not None else ""
    if resume or not training or overwrite or output_dir is None:
        return resume
    existing = sorted(p.name for p in Path(output_dir).glob("checkpoint*.pth"))
    if existing:
        raise CheckpointError(
            f"--output_dir {output_dir} already holds a run ({', '.join(existing)}); a fresh run would "
            "overwrite it. Continue it with --resume auto, or give another --output_dir "
            "(--overwrite starts afresh in this folder)"
        )
    return resume


# ---------------------------------------------------------------------------------------------
# Applying to a model

_SHOWN = 8


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _hints(missing: list[str], unexpected: list[str], shapes: dict[str, tuple[list, list]]) -> list[str]:
    """Likely causes, in words a user can act on."""
    model_has_masks = any(k.startswith("detr.") for k in missing)
    ckpt_has_masks = any(k.startswith("detr.") for k in unexpected)
    if model_has_masks and not ckpt_has_masks:
        return ["the model has a mask head (--masks) but the checkpoint is a box-only model; "
                "use --frozen_weights to train a mask head on it"]
    if ckpt_has_masks and not model_has_masks:
        return ["the checkpoint is a segmentation (--masks) model; add --masks"]
    hints = []
    for key, (ckpt_shape, model_shape) in shapes.items():
        if key.endswith("class_embed.weight") and ckpt_shape[1:] == model_shape[1:]:
            hints.append(f"checkpoint for {ckpt_shape[0] - 1} classes, model for {model_shape[0] - 1}; "
                         "use --finetune to adapt")
        if key.endswith("query_embed.weight") and ckpt_shape[1:] == model_shape[1:]:
            hints.append(f"checkpoint has {ckpt_shape[0]} queries, model {model_shape[0]}; "
                         f"set --num_queries {ckpt_shape[0]} or use --finetune")
    differing = missing + unexpected + list(shapes)
    if any(".layers." in k for k in missing + unexpected):
        hints.append("the number of encoder/decoder layers differs; match --enc_layers/--dec_layers to the checkpoint")
    if any("backbone." in k for k in differing):
        hints.append("the backbone differs; match --backbone/--dilation to the checkpoint")
    if any(k.endswith(("in_proj_weight", "linear1.weight")) for k in shapes) or any(
        k.endswith(".weight") and "input_proj" in k for k in shapes
    ):
        hints.append("the transformer width differs; match --hidden_dim/--dim_feedforward to the checkpoint")
    return hints


# The one tensor only training uses: Group DETR's query groups 1..K-1 (under `detr.` in a mask model).
GROUP_QUERIES = "group_query_embed.weight"


def fit_training_only(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                      what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Reconcile Group DETR's training-only queries between a checkpoint and `model`.

    A checkpoint trained with --group_detr K > 1 holds `group_query_embed.weight` [(K-1)*Q, d]
    (under `detr.` in a mask model), which inference does not use. A model built without it (hub,
    predict.py, --eval, export, --finetune) leaves it out with a one-line note; a model with it
    keeps its fresh one when the checkpoint has none. Everything else is returned unchanged (a K
    mismatch is then a shape difference).
    """
    expected = model.state_dict()
    sd = dict(state_dict)
    for key in [k for k in sd if k.endswith(GROUP_QUERIES) and k not in expected]:
        print(f"{what}: left out {key} (the extra query groups of --group_detr; training only, "
              "the model uses group 0, query_embed.weight)")
        del sd[key]
    for key in [k for k in expected if k.endswith(GROUP_QUERIES) and k not in sd]:
        print(f"{what}: has no {key}; the extra query groups of --group_detr start from their fresh initialisation")
        sd[key] = expected[key]
    return sd


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load `state_dict` into `model` strictly; on any difference raise CheckpointError listing it.

    `what` names the source in the message (e.g. "checkpoint runs/a/checkpoint.pth"). Training-only
    tensors (Group DETR's extra queries) are reconciled by fit_training_only. BatchNorm
    `num_batches_tracked` counters are the other tolerated difference (absent from some exports,
    never used by DETR's frozen BatchNorm): missing ones keep the model's value, extra ones are dropped.
    """
    expected = model.state_dict()
    sd = fit_training_only(model, state_dict, what)
    for key in list(sd):
        if key.endswith("num_batches_tracked") and key not in expected:
            del sd[key]
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = value

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = {
        k: (list(sd[k].shape), list(expected[k].shape))
        for k in expected
        if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != expected[k].shape
    }
    if missing or unexpected or shapes:
        lines = [f"{what} does not fit the model built from the flags:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            shown = [f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in shapes.items()]
            lines.append(f"  shape mismatches ({len(shapes)}): " + _listing(shown))
        lines += [f"  hint: {h}" for h in _hints(missing, unexpected, shapes)]
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# Random number generators


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and every CUDA device when available) RNG states.

    Out: a dict of tensors and plain numbers, so a checkpoint holding it loads with weights_only=True.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators captured by capture_rng_state (CUDA only if both sides have it)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
