"""The learning-rate schedule: linear warm-up, then linear decay, as a torch ``LambdaLR``.

transformers' ``get_linear_schedule_with_warmup`` is the same shape one update later: its factor of the
first update is 0 (``step / warmup``), ours ``1 / warmup`` (the first update already moves), so it would
change every warm-up step of every run; torch's ``LambdaLR`` carries our factor instead, and its
``state_dict`` is the one checkpoints have always held."""

from __future__ import annotations

import torch


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor of the update with 0-based index ``step``.

    Rises linearly to 1 over ``warmup_steps`` updates (the first update already moves: 1/warmup),
    then falls linearly towards 0, reaching 1/(total - warmup) on the last update.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def warmup_linear_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_linear_decay` applied to every parameter group's learning rate."""

    # A plain function, not a functools.partial: LambdaLR saves a callable object's __dict__ in its
    # state_dict, so checkpoints keep holding the same scheduler state as before.
    def factor(step: int) -> float:
        return warmup_linear_decay(step, warmup_steps, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
