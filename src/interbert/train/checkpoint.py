"""What a run leaves in ``output_dir`` and how it resumes: the full training state (``checkpoint.pt``,
and ``checkpoint-<step>.pt`` for the last K saves), the loss history and the final weights. Every
file is written through :mod:`interbert.utils.files`, so a failed save keeps the previous file."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interbert.errors import DataError, shown
from interbert.utils import files

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"  # latest full training state, for resume
NUMBERED_CHECKPOINT = "checkpoint-{step}.pt"  # with keep_checkpoints: one per kept save
BEST_MODEL_DIR = "model_best"  # the weights of the best evaluation (train.best_metric)
HISTORY_NAME = "loss_history.json"  # per-step losses and lr, for plots
FINAL_WEIGHTS_NAME = "model.pt"  # state dict after the last step (EMA weights when EMA is on)
CHECKPOINT_FORMAT = 1

# Settings that fix the data order and the meaning of a step: a resume with other values
# could not continue the same run.
_RESUME_INVARIANTS = ("seed", "batch_size", "grad_accum_steps", "drop_last")

# The library's argument order (path, obj); kept under this name, which train.py used to define with
# the arguments swapped, for code that imported it from interbert.train.
atomic_write_json = files.atomic_write_json


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through the project's crash-safe write: a save that fails (full disk, Ctrl-C) keeps
    the previous checkpoint and leaves no temporary file behind."""
    files.atomic_write(path, lambda handle: torch.save(obj, handle))


def save_weights_folder(model: nn.Module, folder: Path) -> None:
    """The default ``save_best``: a ``save_pretrained`` folder, or the state dict in ``model.pt``."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        torch.save(model.state_dict(), folder / FINAL_WEIGHTS_NAME)


def save_rank_weights(model: nn.Module, output_dir: Path, rank: int, step: int) -> Path:
    """A rank's current (not averaged) weights to ``rank_weights/rank{r}_step{n}.safetensors`` (debugging DDP:
    the ranks must stay identical)."""
    from safetensors.torch import save_file

    path = output_dir / "rank_weights" / f"rank{rank}_step{step}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied weights)
    save_file({name: value.detach().cpu().clone() for name, value in model.state_dict().items()}, str(path))
    return path


def write_history(output_dir: Path, history: Mapping[str, list], eval_history: list) -> None:
    files.atomic_write_json(output_dir / HISTORY_NAME, {**history, "eval": eval_history})


def write_checkpoint(state: Mapping[str, Any], output_dir: Path, step: int, keep: int | None) -> Path:
    """``state`` to ``checkpoint.pt``; with ``keep`` (K) to ``checkpoint-<step>.pt`` as well, linked as
    ``checkpoint.pt``, and only the K newest numbered ones up to ``step`` kept."""
    path = output_dir / CHECKPOINT_NAME
    if keep:
        numbered = output_dir / NUMBERED_CHECKPOINT.format(step=step)
        atomic_torch_save(state, numbered)
        files.atomic_link(numbered, path)  # checkpoint.pt: the latest, what --resume reads
        delete_old_checkpoints(output_dir, step, keep)
    else:
        atomic_torch_save(state, path)
    return path


def delete_old_checkpoints(output_dir: Path, step: int, keep: int) -> None:
    """Keep the ``keep`` newest numbered checkpoints up to ``step``. Newer numbers are left over from a
    run that was killed and resumed from an earlier checkpoint: this run is rewriting that stretch, so
    they go too."""
    numbered = {}
    for candidate in output_dir.glob("checkpoint-*.pt"):
        match = re.fullmatch(r"checkpoint-(\d+)\.pt", candidate.name)
        if match:
            numbered[int(match.group(1))] = candidate
    kept = sorted(saved for saved in numbered if saved <= step)[-keep:]
    for saved, candidate in numbered.items():
        if saved not in kept:
            candidate.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The training state in ``path``; a missing, damaged or foreign file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- only a damaged or refused file is translated
        from interbert.loading import unreadable_weights_reason

        reason = unreadable_weights_reason(error)
        if reason is None:
            raise
        raise DataError(f"{path}: cannot resume from this checkpoint: {reason}") from error
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: cannot resume: unknown checkpoint format {shown(found)}")
    return state


def check_same_run(state: Mapping[str, Any], config, world_size: int, path: Path) -> None:
    """Refuse to resume with settings that change the data order or the meaning of a step (``config``:
    the TrainConfig now); warn about any other changed setting."""
    saved_config = state["train_config"]
    mismatched = {
        key: (saved_config.get(key), getattr(config, key))
        for key in _RESUME_INVARIANTS
        if saved_config.get(key) != getattr(config, key)
    }
    if state["world_size"] != world_size:
        mismatched["world_size"] = (state["world_size"], world_size)
    if mismatched:
        details = ", ".join(f"{key}: checkpoint {old!r} vs now {new!r}" for key, (old, new) in mismatched.items())
        raise ValueError(f"{path}: cannot continue the same run with different settings ({details})")
    changed = [key for key, value in config.to_dict().items() if saved_config.get(key) != value]
    if changed:
        logger.warning("resuming %s with changed settings: %s", path, ", ".join(changed))
