"""The one check of --device shared by main.py, predict.py and tools/."""
from __future__ import annotations

import torch


def resolve_device(name: str | None) -> torch.device:
    """`name` as a torch.device, refused with one line naming --device and the fix when it is not a
    device name or asks for CUDA on a machine without it; None picks CUDA when present, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:N): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; pass --device cpu")
    return device
