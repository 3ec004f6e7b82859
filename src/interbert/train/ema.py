"""Exponential moving average of the weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


class ExponentialMovingAverage:
    """Shadow copy of a model's floating-point state: ``shadow <- d * shadow + (1 - d) * current``."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {
            name: value.detach().clone()
            for name, value in model.state_dict().items()
            if value.dtype.is_floating_point
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach().to(self.shadow[name].dtype), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


@contextlib.contextmanager
def averaged_weights(model: nn.Module, ema: ExponentialMovingAverage | None) -> Iterator[nn.Module]:
    """``model`` holding the EMA weights (when there is an EMA) inside the block, then its own again."""
    if ema is None:
        yield model
        return
    backup = {name: value.detach().clone() for name, value in model.state_dict().items()}
    ema.copy_to(model)
    try:
        yield model
    finally:
        model.load_state_dict(backup)
