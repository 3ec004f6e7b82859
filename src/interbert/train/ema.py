"""Exponential moving average of the weights, on torch's ``AveragedModel``.

``AveragedModel`` keeps the averaged copy and walks parameters and buffers; the update rule is ours
rather than ``get_ema_multi_avg_fn``'s, which cannot give the same numbers: its decay is fixed (no
warm-up) and it does float arithmetic on integer buffers (BERT's position ids), which truncates."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class ExponentialMovingAverage:
    """Shadow copy of a model's floating-point state: ``shadow <- d * shadow + (1 - d) * current``.

    With ``warmup`` the decay after n updates is ``min(decay, (1 + n) / (10 + n))``, so a short run's
    average is not dominated by the initial weights. The average starts at the weights the model has
    when this is built (not at the first update's, where ``AveragedModel`` would start it).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0  # a python int: the decay is known without reading a device tensor
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.update_parameters(model)  # AveragedModel's first update copies: the initial weights

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The averaged floating-point entries of the model's state dict (views: writing them writes the average)."""
        return {name: value for name, value in self.averaged.module.state_dict().items()
                if value.dtype.is_floating_point}

    @torch.no_grad()
    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _n_averaged) -> None:
        # AveragedModel calls this once per (device, dtype) group of tensors
        if averaged[0].dtype.is_floating_point:
            torch._foreach_lerp_(averaged, current, 1.0 - self.current_decay())
        else:  # integer buffers (position ids) are not averaged: they follow the model
            torch._foreach_copy_(averaged, current)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=False)

    def state_dict(self) -> dict[str, Any]:
        # the layout checkpoints have always held (not AveragedModel's): old checkpoints resume, and
        # these are read by older code
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        shadow = self.shadow
        for name, value in state["shadow"].items():
            shadow[name].copy_(value)


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
