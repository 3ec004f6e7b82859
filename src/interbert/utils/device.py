"""Which torch device a process runs on: shared by training, evaluation and the search service, so it
lives apart from all of them (the service must not import the training loop to pick a GPU)."""

from __future__ import annotations

import torch

from interbert.errors import UsageError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU. ``cuda`` without an index is this process's
    GPU too (``cuda:LOCAL_RANK``: under torchrun each rank its own, not all of them on GPU 0)."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def checked_device(name: str, option: str = "--device", local_rank: int = 0) -> torch.device:
    """:func:`resolve_device` for a device a user named (``cpu``, ``cuda``, ``cuda:N``, ``auto``): one that
    cannot be used here is a usage error naming ``option``, not a torch error at the first forward."""
    try:
        device = resolve_device(name, local_rank)
    except RuntimeError:
        raise UsageError(f"{option} {name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{option} {name!r}: only cpu, cuda, cuda:N and auto are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
