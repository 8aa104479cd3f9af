"""Tensors a module reuses from one call to the next, so CPU inference stops page-faulting them.

glibc serves every block over 32 MiB (its largest mmap threshold) with a fresh mmap and unmaps it
on free, and may trim smaller ones back to the kernel, so a forward that allocates a large
activation touches every one of its pages anew on each call. fast/allocator.py changes that for the
whole process; these buffers keep it to the few tensors the fast path owns.

Per thread (two threads running one model never share a buffer); a buffer is replaced when the
shape, dtype or device changes, or when an inference-mode buffer is needed outside inference mode.
"""
from __future__ import annotations

import threading

import torch

# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: blocks this large are always mapped afresh.
ALWAYS_MAPPED_BYTES = 32 * 1024 * 1024


class ScratchBuffers:
    """Named tensors kept per thread; `get` returns the kept one when it fits, else a new one."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, like: torch.Tensor,
            memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """An uninitialised tensor of `shape` with `like`'s dtype and device (the kept one for `name`
        if it matches). Its contents are whatever the last user left: overwrite it entirely."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(name)
        if (not _usable(buffer, like) or buffer.shape != tuple(shape)
                or not buffer.is_contiguous(memory_format=memory_format)):
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
            buffers[name] = buffer
        return buffer

    def arena(self, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat uninitialised buffer of at least `numel` elements, kept and only ever grown, for
        temporaries carved out of it by callers that run one at a time (they are dead once the
        caller returns, so layers of different sizes share it: its size is the largest need)."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(name)
        if not _usable(buffer, like) or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            buffers[name] = buffer
        return buffer

    def clear(self) -> None:
        """Drop this thread's buffers (their memory goes back to the allocator)."""
        self._local.__dict__.pop("buffers", None)

    # A module holding one can be deep-copied or pickled: the copy starts with no buffers.
    def __deepcopy__(self, memo: dict) -> ScratchBuffers:
        return ScratchBuffers()

    def __reduce__(self) -> tuple:
        return (ScratchBuffers, ())


def _usable(buffer: torch.Tensor | None, like: torch.Tensor) -> bool:
    """A kept buffer of `like`'s dtype and device that may be written here (an inference-mode
    tensor cannot be written outside inference mode)."""
    return (buffer is not None and buffer.dtype == like.dtype and buffer.device == like.device
            and not (buffer.is_inference() and not torch.is_inference_mode_enabled()))
