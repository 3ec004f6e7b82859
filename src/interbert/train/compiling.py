"""``train.compile``: the training step through ``torch.compile``, and the time compiling took.

The model runs in its static-shape mode (``set_static_shapes``) so that a step captures as one graph, and is
compiled with ``dynamic=False``: with length buckets in the collate the shapes are few, one graph each (and
torch 2.13's automatic dynamic shapes failed this step's compiled backward on the CPU, an inductor stride
assertion on a mask). ``seconds`` is the compile time every end-to-end figure must include: the first
micro-batch compiles, the second does not, and their difference is it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from interbert.errors import UsageError
from interbert.train.config import CUDA_COMPILE_MODES

logger = logging.getLogger(__name__)

# Graphs a compiled run may need, one per input shape: (text, regions) buckets, at most 4 x 4 with ``auto``,
# times 2 for the MSM budget's rare full-size batch (data.msm_budget), times 2 for the masked and matching
# batches of task_sampling=alternate. Dynamo's default is 8 per function, past which it runs the step eagerly.
RECOMPILE_LIMIT = 64


class CompiledStep:
    """What ``train.compile`` (``off`` | ``default`` | a CUDA mode) does to the loop's model and step."""

    def __init__(self, mode: str, device: torch.device):
        if mode in CUDA_COMPILE_MODES and device.type != "cuda":
            raise UsageError(f"train.compile={mode} is a CUDA mode (CUDA graphs / GPU autotuning); on "
                             f"{device.type} use train.compile=default or off")
        self.mode, self.device = mode, device
        self.seconds: float | None = None
        self._times: list[float] = []  # the first two micro-batches' times, while ``seconds`` is unknown

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def wrap(self, model: nn.Module, step_module: nn.Module, collate_fn: Callable) -> nn.Module:
        """``step_module`` (the DDP-wrapped ``model``) compiled, ``model`` in its static-shape mode; off: as it is.
        ``model`` stays the bare module the loop names, averages, saves and evaluates."""
        if not self.on:
            return step_module
        if hasattr(model, "set_static_shapes"):
            model.set_static_shapes(True)
        keywords = getattr(collate_fn, "keywords", None) or {}
        if not (keywords.get("length_buckets") and keywords.get("region_buckets")):
            logger.warning("train.compile without data.length_buckets and data.region_buckets: every new padded "
                           "length compiles again (set both to auto)")
        logger.info("train.compile=%s (static shapes, one graph per bucket): the first step compiles", self.mode)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        return torch.compile(step_module, mode=self.mode, dynamic=False)

    def timed(self, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``, timing the first two micro-batches of a compiled run."""
        if not self.on or self.seconds is not None:
            return step(*args)
        start = time.perf_counter()
        result = step(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._times.append(time.perf_counter() - start)
        if len(self._times) == 2:
            first, second = self._times
            self.seconds = max(0.0, first - second)
            logger.info("compile_seconds %.1f (first micro-batch %.2f s, second %.2f s)", self.seconds, first, second)
        return result

    def finish(self) -> float | None:
        """The compile time once the run's steps are over (a one-step run: all of its first step, an upper bound)."""
        if self.on and self.seconds is None and self._times:
            self.seconds = self._times[0]
        return self.seconds

    def restore(self, model: nn.Module) -> None:
        """``model`` back in its default mode, as callers know it (``msm_logits`` of the masked tokens)."""
        if self.on and hasattr(model, "set_static_shapes"):
            model.set_static_shapes(False)
