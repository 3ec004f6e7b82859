"""The optimizer's side of a step: parameter groups (weight decay, per-name learning-rate factors),
which parameters train at all, and the (loss-scaled) update with clipping."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from interbert.errors import UsageError


def lr_multiplier_from_patterns(patterns: Mapping[str, float]) -> Callable[[str], float]:
    """Map a parameter name to the factor of the first fnmatch pattern it matches (default 1)."""

    def multiplier(name: str) -> float:
        for pattern, factor in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                return float(factor)
        return 1.0

    return multiplier


def build_param_groups(
    model: nn.Module, weight_decay: float, lr_multiplier_for: Callable[[str], float]
) -> list[dict[str, Any]]:
    """AdamW parameter groups keyed by (lr factor, decayed?).

    1-d parameters (biases, LayerNorm weights) get no weight decay: shrinking a LayerNorm gain or a
    bias towards 0 is not regularisation, it changes the function.
    """
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        factor = float(lr_multiplier_for(name))
        decayed = param.ndim >= 2
        group = groups.setdefault(
            (factor, decayed),
            {
                "params": [],
                "param_names": [],
                "lr_multiplier": factor,
                "weight_decay": weight_decay if decayed else 0.0,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(
    model: nn.Module, config, lr_multiplier_for: Callable[[str], float], device: torch.device
) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` with ``config``'s (a TrainConfig) rate, betas and epsilon; each
    group's learning rate is the base rate times its factor."""
    optimizer = torch.optim.AdamW(
        build_param_groups(model, config.weight_decay, lr_multiplier_for),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        # One fused kernel over all parameters instead of a dozen small ops per tensor: 3.5x faster
        # updates for the tiny preset on CPU (7.2 -> 2.1 ms), the same algorithm.
        fused=device.type in ("cpu", "cuda"),
    )
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate * group["lr_multiplier"]
    return optimizer


def freeze_unused_parameters(model: nn.Module) -> list[str]:
    """Freeze the parameters that ``model.unused_parameter_names()`` names (none when it has no such
    method) and return their names."""
    names_of_unused = getattr(model, "unused_parameter_names", None)
    unused = set(names_of_unused()) if callable(names_of_unused) else set()
    for name, param in model.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    return sorted(unused)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on gradient checkpointing the transformers way (non-reentrant ``torch.utils.checkpoint``);
    a model without support for it is refused rather than silently trained without it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    # transformers >= 5 renamed gradient_checkpointing_enable (now a deprecated alias)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def mixed_precision(bf16: bool, fp16: bool, device: torch.device) -> tuple[bool, bool, torch.amp.GradScaler]:
    """Whether to autocast to bfloat16 (CUDA only: bf16 matmuls are ~100x slower on a CPU) or float16, and
    the loss scaler. The scaler is a no-op unless fp16: then the loss is scaled up before backward (small
    fp16 gradients would underflow to 0) and the gradients unscaled before clipping; a step whose
    gradients overflowed is skipped and the scale lowered."""
    if fp16 and device.type != "cuda":
        raise UsageError(f"TrainConfig.fp16 needs a CUDA device, not {device} (float16 autocast and loss "
                         "scaling are for GPUs; leave train.fp16=false on CPU)")
    return bf16 and device.type == "cuda", fp16, torch.amp.GradScaler(device.type, enabled=fp16)


def scaled_optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, parameters: Iterator[nn.Parameter],
    max_grad_norm: float | None,
) -> float | None:
    """One update from gradients that ``scaler`` scaled: unscale them first, so that clipping sees the true
    norm, then step (skipped by the scaler when a gradient is inf/NaN) and adjust the scale. Returns the
    gradient norm before clipping (None without clipping). With a disabled scaler: clip + step."""
    grad_norm = None
    scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(parameters), max_grad_norm))
    scaler.step(optimizer)
    scaler.update()
    return grad_norm
