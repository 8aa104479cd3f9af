"""Progress logging for the training and evaluation loops.

- `SmoothedValue`: a series of numbers with a windowed median/average and a global average.
- `MetricLogger`: a dict of SmoothedValues; `log_every(iterable, print_freq, header, shown)` yields
  the items and prints a line every `print_freq` iterations with the ETA, the meters (all, or the
  `shown` ones), the iteration and data-loading times (and peak CUDA memory when on a GPU).
- `accuracy(output, target, topk)`: top-k accuracy in percent (the criterion's class_error).
"""
from __future__ import annotations

import datetime
import time
from collections import defaultdict, deque
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class SmoothedValue:
    """Running statistics of a scalar: window median/avg over the last `window_size` updates,
    global average over all of them (what the epoch stats report)."""

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over all processes (the window stays local)."""
        if not _dist_ready():
            return
        backend_cuda = dist.get_backend() == "nccl"
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device="cuda" if backend_cuda else "cpu")
        dist.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(torch.tensor(list(self.deque), dtype=torch.float64).mean().item()) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Named SmoothedValues plus the progress printer of the training/evaluation loops."""

    def __init__(self, delimiter: str = "  "):
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: Any) -> None:
        """Add one value per name; tensors must hold a single number."""
        for name, value in kwargs.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (float, int)):
                raise TypeError(f"MetricLogger.update: {name} must be a number, got {type(value).__name__}")
            self.meters[name].update(float(value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, name: str) -> SmoothedValue:
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or meter {name!r}")

    def __str__(self) -> str:
        return self.format()

    def format(self, shown: Sequence[str] | None = None) -> str:
        """`name: value` of every meter, or of the `shown` names that exist, in `shown`'s order."""
        names = list(self.meters) if shown is None else [n for n in shown if n in self.meters]
        return self.delimiter.join(f"{name}: {self.meters[name]}" for name in names)

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  shown: Sequence[str] | None = None) -> Iterator:
        """Yield the items of `iterable`, printing progress every `print_freq` items and at the end.

        The printed line: header, [i/total], eta, meters, time (per iteration), data (waiting for
        the loader), max mem (MB, CUDA only); then a total-time line. With `shown`, only those
        meters (see `format`) and no data time: a line a person reads at a glance.
        """
        total = len(iterable) if hasattr(iterable, "__len__") else None
        width = len(str(total)) if total else 1
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        i = 0
        for item in iterable:
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            last = total is not None and i == total - 1
            if print_freq > 0 and (i % print_freq == 0 or last):
                parts = [header, f"[{i:>{width}}/{total if total is not None else '?'}]"]
                if total is not None:
                    eta = iter_time.global_avg * (total - i - 1)
                    parts.append(f"eta: {datetime.timedelta(seconds=int(eta))}")
                parts += [self.format(shown), f"time: {iter_time}"]
                if shown is None:
                    parts.append(f"data: {data_time}")
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
                print(self.delimiter.join(p for p in parts if p), flush=True)
            i += 1
            end = time.time()
        elapsed = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(elapsed))} "
              f"({elapsed / max(i, 1):.4f} s / it)", flush=True)


@torch.no_grad()
def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """Top-k accuracy in percent. output [N, C] scores, target [N] class indices.
    Returns one 0-d tensor per k; [0.0] each when there are no targets."""
    if target.numel() == 0:
        return [torch.zeros([], device=output.device) for _ in topk]
    maxk = max(topk)
    _, pred = output.topk(maxk, dim=1)
    correct = pred.t().eq(target.view(1, -1))
    return [correct[:k].reshape(-1).float().sum(0).mul(100.0 / target.size(0)) for k in topk]
