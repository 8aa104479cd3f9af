"""Keep freed memory in the process (glibc malloc), so CPU inference and training stop page-faulting
their activations.

A DETR forward at 800x1066 allocates tens of activations of 14-55 MB. glibc serves blocks that
large with a fresh mmap and unmaps them on free, so every forward touches new pages: the kernel
zeroes them and takes a page fault per 4 KiB. torch's CPU launcher (`torch.backends.xeon.run_cpu`)
swaps in jemalloc or tcmalloc for the same reason; this does it without a new library, by telling
glibc to take every block from its heap and never give freed memory back, so the next forward
reuses the same pages. CPU training has the same pattern, larger (attention matrices and their
gradients).
The process keeps its peak memory for as long as it lives: meant for bounded jobs (predict.py,
main.py), whose peak is reached again every step anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Ask glibc malloc to serve large blocks from its heap (no mmap) and never trim the heap.

    Returns True when the settings took effect; False where there is no glibc (macOS, Windows,
    musl), in which case nothing changes. Only allocations made after the call are affected.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success, 0 on error.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
