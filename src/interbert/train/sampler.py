"""The seeded data order: which examples each rank reads in each epoch, and batches built under RNGs
seeded from ``(seed, epoch, rank, batch index)``, so that random masking is the same with any
``num_workers`` and after a resume."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from interbert.train.rng import batch_seed, seeded_rng


def epoch_batches(
    dataset: Dataset, batch_size: int, epoch: int, seed: int, rank: int, world_size: int, drop_last: bool
) -> list[list[int]]:
    """This rank's batches (lists of dataset indices) of one epoch, in order."""
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    indices = list(sampler)
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class _SeededBatches(Dataset):
    """Item k is the collated batch k of the epoch, built under RNGs seeded for that batch.

    Seeding per batch makes random masking a function of the position in the data order (the same
    in any worker process and after a resume), and the save/restore around it keeps data loading
    from consuming the training RNG.

    A dataset with ``set_progress(step, total_steps)`` (a schedule over the run, e.g. the share of hard
    negatives) is told, before each batch is built and in the process that builds it, the optimisation
    step the batch is for: ``(epoch * batches_per_epoch + batch index) // grad_accum_steps``, the
    update its gradient joins.
    """

    def __init__(self, dataset, batches, collate_fn, seed: int, epoch: int, rank: int, start: int,
                 progress: tuple[int, int, int] | None = None):
        self.dataset, self.batches, self.collate_fn = dataset, batches, collate_fn
        self.seed, self.epoch, self.rank, self.start = seed, epoch, rank, start
        self.progress = progress  # (batches_per_epoch, grad_accum_steps, total_steps)

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __getitem__(self, position: int):
        batch_index = self.start + position
        if self.progress is not None and hasattr(self.dataset, "set_progress"):
            per_epoch, accumulate, total = self.progress
            self.dataset.set_progress((self.epoch * per_epoch + batch_index) // accumulate, total)
        with seeded_rng(batch_seed(self.seed, self.epoch, self.rank, batch_index)):
            return self.collate_fn([self.dataset[i] for i in self.batches[batch_index]])


def _as_is(batch):
    return batch


def seeded_loader(
    dataset: Dataset, batches: list[list[int]], collate_fn: Callable[[list[Any]], Mapping[str, Any]], *,
    seed: int, epoch: int, rank: int, start: int, progress: tuple[int, int, int], num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    """A DataLoader over one epoch's ``batches`` from batch ``start`` on, each built by ``_SeededBatches``."""
    return DataLoader(
        _SeededBatches(dataset, batches, collate_fn, seed=seed, epoch=epoch, rank=rank, start=start,
                       progress=progress),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        # Its own generator: creating an iterator would otherwise draw a worker seed from the
        # global torch RNG, and a resumed run creates its first iterator at another moment.
        generator=torch.Generator().manual_seed(seed),
    )
