"""Plots of a run: training curves from log.txt and precision/recall from saved COCO evaluations.

Same entry points as the original (`plot_logs`, `plot_precision_recall`), drawn with
matplotlib's Agg backend so they work on a headless machine; pass `out_file` to save a PNG.
Both return the figure and axes, so a notebook can still show or restyle them.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display needed; a notebook's inline backend is set before import
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

PathLike = str | os.PathLike


def _as_path_list(paths: PathLike | Iterable[PathLike], what: str) -> list[Path]:
    if isinstance(paths, (str, PurePath)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise ValueError(f"{what}: no paths given")
    return out


def _save(fig: plt.Figure, out_file: PathLike | None) -> None:
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_file, dpi=100)


def plot_logs(
    logs: PathLike | Iterable[PathLike],
    fields: Sequence[str] = ("class_error", "loss_bbox_unscaled", "mAP"),
    ewm_col: float = 0,
    log_name: str = "log.txt",
    out_file: PathLike | None = None,
) -> tuple[plt.Figure, np.ndarray]:
    """One panel per field, one colour per run: train (solid) and test (dashed) per epoch.

    In: run directories holding `log_name` (one JSON object per epoch, keys `train_<field>`,
    `test_<field>`); `ewm_col` is the pandas ewm centre of mass used to smooth (0 = none).
    The field 'mAP' plots test AP@0.5 (index 1 of `test_coco_eval_bbox`, as the original did).
    Out: (figure, axes); with `out_file` the figure is also saved there as PNG.
    """
    dirs = _as_path_list(logs, "plot_logs")
    frames = []
    for run in dirs:
        if not run.is_dir():
            raise ValueError(f"plot_logs: {run} is not a directory; pass run directories (--output_dir), not log files")
        log = run / log_name
        if not log.is_file():
            raise ValueError(f"plot_logs: {log} does not exist; is {run} a training output directory?")
        frames.append(pd.read_json(log, lines=True))
    fig, axes = plt.subplots(ncols=len(fields), figsize=(4 * len(fields), 4), squeeze=False)
    axes = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run_index, (run, df) in enumerate(zip(dirs, frames)):
        colour = colours[run_index % len(colours)]
        epochs = df["epoch"] if "epoch" in df else pd.Series(range(len(df)))
        for ax, field in zip(axes, fields):
            if field == "mAP":
                if "test_coco_eval_bbox" not in df:
                    continue
                stats = df["test_coco_eval_bbox"].dropna()
                ap50 = pd.Series([row[1] for row in stats], index=stats.index).ewm(com=ewm_col).mean()
                ax.plot(epochs[stats.index], ap50, color=colour, label=run.name)
                continue
            for split, style in (("train", "-"), ("test", "--")):
                column = f"{split}_{field}"
                if column in df:
                    values = df[column].astype(float).ewm(com=ewm_col).mean()
                    ax.plot(epochs, values, style, color=colour, label=f"{run.name} {split}")
    for ax, field in zip(axes, fields):
        ax.set_title("mAP (AP@0.5)" if field == "mAP" else field)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, out_file)
    return fig, axes


# Arrays and scalars (e.g. params.imgIds) in a saved pycocotools `eval` dict; numpy's
# reconstruction is the only code it needs.
_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype] + [
    getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")
]


def load_eval(file: PathLike) -> dict:
    """A saved COCO evaluation (eval/*.pth): a dict with 'precision', 'recall', 'scores' arrays."""
    with torch.serialization.safe_globals(_NUMPY_GLOBALS):
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read the COCO evaluation {file}: {err}") from err
    missing = [k for k in ("precision", "recall", "scores") if k not in data]
    if missing:
        raise ValueError(f"{file} lacks {missing}; expected an eval/*.pth written by main.py")
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in data.items()}


def _curve(values: np.ndarray) -> np.ndarray:
    """Mean over classes of [R, K] values, ignoring -1 (classes without ground truth)."""
    values = np.asarray(values, dtype=np.float64)
    valid = values > -1
    counts = valid.sum(axis=1)
    return np.where(counts > 0, (values * valid).sum(axis=1) / np.maximum(counts, 1), np.nan)


def plot_precision_recall(
    files: PathLike | Iterable[PathLike], naming_scheme: str = "iter", out_file: PathLike | None = None
) -> tuple[plt.Figure, np.ndarray]:
    """Precision and score against recall at IoU 0.5 (all areas, 100 detections), one line per file.

    In: eval/*.pth files of runs; `naming_scheme` 'iter' labels a line by the file stem (e.g.
    '049'), 'exp_id' by the run directory (the file's grandparent). Classes without ground
    truth (-1 in pycocotools' arrays) are left out of the class mean.
    Out: (figure, axes); with `out_file` the figure is also saved there as PNG.
    """
    if naming_scheme not in ("iter", "exp_id"):
        raise ValueError(f"naming_scheme must be 'iter' or 'exp_id', got {naming_scheme!r}")
    paths = _as_path_list(files, "plot_precision_recall")
    fig, axes = plt.subplots(ncols=2, figsize=(10, 4))
    recall_axis = np.linspace(0, 1, 101)
    for path in paths:
        data = load_eval(path)
        # precision/scores: [IoU T, recall R, class K, area A, max dets M]; index 0 = IoU 0.5.
        precision = _curve(data["precision"][0, :, :, 0, -1])
        scores = _curve(data["scores"][0, :, :, 0, -1])
        name = path.parts[-3] if naming_scheme == "exp_id" and len(path.parts) >= 3 else path.stem
        print(f"{name}: mAP@50={np.nanmean(precision) * 100:.1f}, score={np.nanmean(scores):.3f}")
        axes[0].plot(recall_axis, precision, label=name)
        axes[1].plot(recall_axis, scores, label=name)
    axes[0].set_title("Precision / Recall (IoU 0.5)")
    axes[0].set_ylabel("precision")
    axes[1].set_title("Scores / Recall (IoU 0.5)")
    axes[1].set_ylabel("score")
    for ax in axes:
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, out_file)
    return fig, axes
