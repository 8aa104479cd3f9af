"""Exponential moving average (EMA) of a model's weights, a training-only accelerator (--ema DECAY).

The averaged copy is what RT-DETR, DINO and RF-DETR evaluate and ship: it smooths the noisy
late-epoch weights of a set-prediction model. It has the model's architecture and state-dict
layout, so its weights are an ordinary DETR checkpoint.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """ema = d * ema + (1 - d) * weights after every optimizer step, d = min(decay, (1 + n) / (10 + n)).

    The warm-up term (n = updates so far) lets the average forget the random initialisation within
    the first few hundred steps instead of ~1 / (1 - decay) steps. Floating-point buffers (BatchNorm
    running statistics) are averaged like weights; integer ones (num_batches_tracked) are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        """`model`: the unwrapped model being trained (not the DDP or torch.compile wrapper)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema {decay}: the decay must be in (0, 1), e.g. 0.999; 0 turns EMA off")
        self.source = model
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the trained model's current weights (call after optimizer.step())."""
        d = self.current_decay()
        self.updates += 1
        for ema_t, t in zip(self.module.state_dict().values(), self.source.state_dict().values()):
            if ema_t.is_floating_point():
                ema_t.lerp_(t.detach().to(ema_t.dtype), 1.0 - d)
            else:
                ema_t.copy_(t)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"], strict=True)
        self.updates = int(state["updates"])
