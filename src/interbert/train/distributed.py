"""Joining and leaving the process group torchrun describes, and running set-up on rank 0 first.

``batch_size`` is per process and per micro-batch, so one update sees ``batch_size * grad_accum_steps *
world_size`` examples; only rank 0 writes logs and checkpoints."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# Whether init_distributed joined the process group (not the program around it): then the loop that
# finishes leaves it. Recipes join before they build their data (see main_process_first), the loop after.
_joined_process_group = False


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group that torchrun describes in the environment (no-op for one process)."""
    global _joined_process_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and not dist.is_initialized():
        return DistributedContext()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _joined_process_group = True
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        created_process_group=_joined_process_group,
    )


def owns_process_group(context: DistributedContext) -> bool:
    """Whether :func:`init_distributed` joined the process group for this run and it is still joined."""
    return context.created_process_group and dist.is_initialized()


def leave_distributed(context: DistributedContext) -> None:
    """Wait for every rank, then leave the process group :func:`init_distributed` joined. Drop any DDP
    wrapper before (and collect it): its reducer holds the group and would otherwise free it during
    interpreter shutdown, after gloo's threads are gone."""
    global _joined_process_group
    if not owns_process_group(context):
        return
    dist.barrier()
    dist.destroy_process_group()
    _joined_process_group = False


def wrap_for_ddp(model: nn.Module, context: DistributedContext, device: torch.device,
                 find_unused_parameters: bool) -> nn.Module:
    """``DistributedDataParallel(model)`` when there are several processes, else the model itself."""
    if not context.enabled:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


@contextlib.contextmanager
def main_process_first() -> Iterator[bool]:
    """Run a block on the main process (rank 0) first and then on the others; yields whether this is
    the main process. For set-up that every rank must share and that is costly or writes files (a
    trained WordPiece vocabulary, caches): the main process makes and writes it, the others read what
    it wrote.
    A no-op in one process, or before the process group is joined (:func:`init_distributed`)."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    main = not distributed or dist.get_rank() == 0
    if distributed and not main:
        dist.barrier()  # until the main process has run the block
    try:
        yield main
    finally:
        if distributed and main:
            dist.barrier()


def all_gather_objects(context: DistributedContext, obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not context.enabled:
        return [obj]
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
