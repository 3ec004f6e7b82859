"""The one training loop shared by every recipe (pretraining, retrieval fine-tuning, VCR, text tasks).

The loop knows nothing about InterBERT: it trains any ``nn.Module`` whose ``forward(**batch)`` returns
an object with a scalar ``.loss`` (a dataclass, e.g. a transformers ``ModelOutput``). Every other
dataclass field whose name ends in ``_loss`` is logged as a loss component.

What it does, in order of a step: seeded batch -> forward (bf16 or fp16 autocast on CUDA only) -> backward
of ``loss / grad_accum_steps`` (loss-scaled with fp16) -> after ``grad_accum_steps`` micro-batches: unscaling,
gradient clipping, AdamW,
linear warm-up / linear decay schedule, EMA update -> log, evaluate (model_best, early stopping), checkpoint.

Reproducibility contract: the data order is a seeded permutation per epoch (``DistributedSampler`` with
``set_epoch`` semantics), and every batch is built with the python/numpy/torch RNGs seeded from
``(seed, epoch, rank, batch index)``, so random masking is the same with any ``num_workers`` and after
a resume. The training RNG (dropout) is saved in each checkpoint, per rank. Resuming from a
checkpoint therefore reproduces the loss values of an uninterrupted run exactly.

Distributed: launch with ``torchrun --nproc_per_node N ...``; the loop joins the process group torchrun
describes (NCCL on GPU, gloo on CPU), wraps the model in ``DistributedDataParallel`` and shards the data
with ``DistributedSampler``. ``batch_size`` is per process and per micro-batch, so one update sees
``batch_size * grad_accum_steps * world_size`` examples. Only rank 0 writes logs and checkpoints.

DDP all-reduces the gradient of every trainable parameter after each backward and fails when one never
gets a gradient. A model may therefore name, in ``unused_parameter_names()``, the parameters that no
loss of its current configuration reaches (the InterBERT heads do: e.g. the image side of a text
classifier); the loop freezes them, in one process or many alike. ``find_unused_parameters`` remains
for models whose unused parameters change from step to step (slower: DDP then walks the graph each step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gc
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from interbert.data import model_inputs
from interbert.errors import DataError, UsageError, shown
from interbert.utils import files, typed_config

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


@dataclass
class TrainConfig:
    """Settings of the loop. Model, data and loss weights belong to the recipe, not here."""

    output_dir: str = "runs/train"
    seed: int = 0
    batch_size: int = 32  # examples per process per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer update
    max_steps: int | None = None  # optimizer updates; None -> num_epochs over the data
    num_epochs: int = 1
    learning_rate: float = 1e-4
    # fnmatch patterns on parameter names -> learning-rate factor; the first matching pattern wins,
    # e.g. {"interbert.text_stream.*": 0.1} trains those weights 10x slower (recipes: model.bert_lr_factor).
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01  # never applied to biases and LayerNorm weights (1-d parameters)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0  # linear warm-up; 0 -> warmup_ratio * total steps
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0  # None -> no clipping
    # Exponential moving average of the weights (the original fine-tunes with 0.9999); the averaged
    # weights are the ones evaluated and saved. ema_warmup uses min(decay, (1+n)/(10+n)) after n
    # updates, so a short run's average is not dominated by the initial weights.
    ema_decay: float | None = None
    ema_warmup: bool = True
    bf16: bool = True  # autocast to bfloat16 on CUDA; never on CPU (bf16 matmuls are ~100x slower there)
    # autocast to float16 with a dynamic loss scale (torch.amp.GradScaler), for GPUs without bf16 (V100, T4).
    # CUDA only: refused on CPU, and with bf16 (set train.bf16=false).
    fp16: bool = False
    # Recompute each transformer layer's activations in the backward pass instead of keeping them: less
    # memory for a slower step (the model must support it: transformers' gradient_checkpointing_enable).
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto -> cuda:LOCAL_RANK when available, else cpu
    save_every: int | None = None  # checkpoint every N updates (and always at the end)
    log_every: int = 10  # TensorBoard scalars every N updates
    eval_every: int | None = None  # call eval_fn every N updates (and after the last one)
    # Watching a run. best_metric: the eval_fn metric whose best value is kept in model_best/ (None: no
    # model_best); best_mode: max or min (None: min for names ending in "loss" or "rank", else max);
    # early_stopping_patience: end the run after this many evaluations without improvement (None: never).
    best_metric: str | None = None
    best_mode: str | None = None
    early_stopping_patience: int | None = None
    # None: one checkpoint.pt, overwritten. K: checkpoint-<step>.pt for the last K saves as well, with
    # checkpoint.pt the latest of them (what --resume reads).
    keep_checkpoints: int | None = None
    num_workers: int = 0  # DataLoader worker processes
    drop_last: bool = True  # drop the incomplete last batch of an epoch
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step
    # Debugging DDP: every rank writes its weights to rank_weights/rank{r}_step{n}.safetensors when fit
    # starts and when it ends, so that one can check the ranks stayed identical (tests do).
    save_rank_weights: bool = False
    progress_bar: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum_steps", "num_epochs", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "save_every", "eval_every", "early_stopping_patience", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 or None, got {value}")
        if self.best_mode not in (None, "max", "min"):
            raise ValueError(f"TrainConfig.best_mode must be max, min or None, got {self.best_mode!r}")
        # Without evaluations there is nothing to pick a best model by or to stop on; say so rather than
        # silently writing no model_best.
        for name in ("best_metric", "early_stopping_patience"):
            if getattr(self, name) is not None and self.eval_every is None:
                raise ValueError(f"TrainConfig.{name} needs eval_every (evaluations to compare)")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.fp16 and self.bf16:
            raise ValueError("TrainConfig.fp16 and bf16 are both on: choose one (train.bf16=false train.fp16=true)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.num_workers < 0 or self.warmup_steps < 0:
            raise ValueError("TrainConfig.num_workers and warmup_steps must be >= 0")
        for pattern, factor in self.lr_multipliers.items():
            if not isinstance(factor, int | float) or factor < 0:
                raise ValueError(f"TrainConfig.lr_multipliers[{pattern!r}] must be a number >= 0, got {factor!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from a config file's ``train:`` section; an unknown key, or a value of the wrong type
        (``"yes"`` for a bool, ``1.5`` for an int), is a ConfigError (a ValueError) naming it. Ints are
        accepted as floats, paths as str (:mod:`interbert.utils.typed_config`)."""
        return typed_config.from_dict(cls, values, "train", source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_best_mode(self) -> str:
        """``best_mode``, or inferred from ``best_metric``'s name: losses and ranks are better low."""
        if self.best_mode is not None:
            return self.best_mode
        return "min" if (self.best_metric or "").endswith(("loss", "rank")) else "max"


@dataclass
class TrainResult:
    step: int  # optimizer updates done
    epoch: int
    history: dict[str, list[float | None]]  # "loss", each "*_loss" component, "lr", per update
    eval_history: list[dict[str, float]]  # one {"step": s, metric: value, ...} per evaluation
    output_dir: Path
    best: dict[str, Any] | None = None  # {"metric", "mode", "value", "step"} when best_metric is set
    stopped_early: bool = False

    @property
    def loss_history(self) -> list[float]:
        return self.history["loss"]


# ---------------------------------------------------------------------------------------------
# Pure pieces: schedule, parameter groups, EMA, RNG state
# ---------------------------------------------------------------------------------------------


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor of the update with 0-based index ``step``.

    Rises linearly to 1 over ``warmup_steps`` updates (the first update already moves: 1/warmup),
    then falls linearly towards 0, reaching 1/(total - warmup) on the last update.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain types (loadable with ``weights_only=True``)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with the python, numpy and torch CPU RNGs seeded to ``seed``, then restore them."""
    saved_python, saved_numpy, saved_torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: cheaper than torch.manual_seed per batch
    try:
        yield
    finally:
        random.setstate(saved_python)
        np.random.set_state(saved_numpy)
        torch.set_rng_state(saved_torch)


def batch_seed(seed: int, epoch: int, rank: int, batch_index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, batch_index]).generate_state(1)[0])


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


def loss_components(output: Any) -> dict[str, torch.Tensor | None]:
    """The output's ``loss`` and every field named ``*_loss`` (None where the model gave none)."""
    if dataclasses.is_dataclass(output):
        names = [f.name for f in dataclasses.fields(output)]
        values = {name: getattr(output, name) for name in names}
    elif isinstance(output, Mapping):
        values = dict(output)
    else:
        raise TypeError(f"the model must return a dataclass or mapping with a 'loss', got {type(output).__name__}")
    return {name: value for name, value in values.items() if name == "loss" or name.endswith("_loss")}


# ---------------------------------------------------------------------------------------------
# Distributed context and data
# ---------------------------------------------------------------------------------------------


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
    from interbert.errors import UsageError

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


def _count_examples(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError(f"cannot tell the batch size: no tensor in the batch (keys {sorted(batch)})")


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


def atomic_write_json(obj: Any, path: Path) -> None:
    # (obj, path) like torch.save; interbert.utils.files takes (path, obj).
    files.atomic_write_json(path, obj)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Train ``model`` on ``train_dataset``; see the module docstring for the contract.

    ``collate_fn`` turns a list of dataset items into a ``dict`` batch: every key is passed to the model's
    forward except ``meta`` (:data:`interbert.data.META`), the bookkeeping such as ``image_ids``, so
    a key the model does not take is a TypeError, not dropped. ``lr_multiplier_for(name)`` gives
    a parameter's learning-rate factor (e.g. 0.1 for BERT-initialised weights); it replaces
    ``config.lr_multipliers``. ``eval_fn(model) -> {metric: value}`` runs on rank 0 every
    ``eval_every`` updates, in eval mode, without gradients, with the EMA weights when EMA is on.
    ``save_best(model, folder)`` writes the model that scored best on ``config.best_metric`` into an
    empty folder (default: ``save_pretrained`` when the model has it, else ``model.pt``); the loop
    puts the folder in place as ``model_best/`` only once it is complete.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        config: TrainConfig,
        collate_fn: Callable[[list[Any]], Mapping[str, Any]] | None = None,
        lr_multiplier_for: Callable[[str], float] | None = None,
        eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        save_best: Callable[[nn.Module, Path], None] | None = None,
    ):
        if lr_multiplier_for is not None and config.lr_multipliers:
            raise ValueError("give either lr_multiplier_for or config.lr_multipliers, not both")
        if config.early_stopping_patience is not None and config.best_metric is None:
            raise ValueError("early_stopping_patience needs best_metric: the metric whose improvement it waits for")
        if config.eval_every is not None and eval_fn is None and config.best_metric is not None:
            raise ValueError("best_metric is set but there is no eval_fn to compute it")
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.train_dataset = train_dataset
        self.collate_fn = collate_fn or default_collate
        self.eval_fn = eval_fn
        self.save_best = save_best or save_weights_folder

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(config.device, local_rank)
        self.dist = init_distributed(self.device)
        self.use_bf16 = config.bf16 and self.device.type == "cuda"
        if config.fp16 and self.device.type != "cuda":
            raise UsageError(f"TrainConfig.fp16 needs a CUDA device, not {self.device} (float16 autocast and loss "
                             "scaling are for GPUs; leave train.fp16=false on CPU)")
        self.use_fp16 = config.fp16
        # A no-op unless fp16: then the loss is scaled up before backward (small fp16 gradients would
        # underflow to 0) and the gradients unscaled before clipping; a step whose gradients overflowed
        # is skipped and the scale lowered.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_fp16)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)

        self.model = model.to(self.device)  # the bare module: names, EMA, saving
        frozen = freeze_unused_parameters(self.model)
        if frozen:
            modules = sorted({".".join(name.split(".")[:2]) for name in frozen})
            logger.info("no loss reaches %d parameter tensors; frozen: %s", len(frozen), ", ".join(modules))
        multiplier = lr_multiplier_for or lr_multiplier_from_patterns(config.lr_multipliers)
        self.optimizer = torch.optim.AdamW(
            build_param_groups(self.model, config.weight_decay, multiplier),
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            # One fused kernel over all parameters instead of a dozen small ops per tensor: 3.5x faster
            # updates for the tiny preset on CPU (7.2 -> 2.1 ms), the same algorithm.
            fused=self.device.type in ("cpu", "cuda"),
        )
        for group in self.optimizer.param_groups:
            group["lr"] = config.learning_rate * group["lr_multiplier"]

        self.batches_per_epoch = len(self._epoch_batches(0))
        if self.batches_per_epoch == 0:
            raise UsageError(
                f"no full batch: {len(train_dataset)} examples over {self.dist.world_size} process(es) "
                f"with batch_size {config.batch_size}"
            )
        if config.max_steps is not None:
            self.total_steps = config.max_steps
        else:
            self.total_steps = config.num_epochs * self.batches_per_epoch // config.grad_accum_steps
            if self.total_steps == 0:
                raise UsageError(
                    f"{config.num_epochs} epoch(s) of {self.batches_per_epoch} batches make no update "
                    f"with grad_accum_steps {config.grad_accum_steps}; set max_steps"
                )
        self.warmup_steps = config.warmup_steps or round(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_linear_decay(step, self.warmup_steps, self.total_steps)
        )
        self.ema = (
            ExponentialMovingAverage(self.model, config.ema_decay, config.ema_warmup) if config.ema_decay else None
        )
        if self.dist.enabled:
            self.ddp_model: nn.Module = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )
        else:
            self.ddp_model = self.model

        # Position in the run: updates done, and the next batch to read.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: dict[str, list[float | None]] = {}
        self.eval_history: list[dict[str, float]] = []
        self._last_saved_step = -1
        # Best evaluation so far and the evaluations since it (early stopping); saved in checkpoints so
        # that a resumed run keeps the same model_best and stops where the uninterrupted run would.
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0

    # -- data ------------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        cfg = self.config
        return epoch_batches(
            self.train_dataset, cfg.batch_size, epoch, cfg.seed, self.dist.rank, self.dist.world_size, cfg.drop_last
        )

    def _loader(self, epoch: int, start: int) -> DataLoader:
        if hasattr(self.train_dataset, "set_epoch"):  # datasets that seed their own masking per (epoch, index)
            self.train_dataset.set_epoch(epoch)
        batches = _SeededBatches(
            self.train_dataset,
            self._epoch_batches(epoch),
            self.collate_fn,
            seed=self.config.seed,
            epoch=epoch,
            rank=self.dist.rank,
            start=start,
            progress=(self.batches_per_epoch, self.config.grad_accum_steps, self.total_steps),
        )
        return DataLoader(
            batches,
            batch_size=None,
            shuffle=False,
            num_workers=self.config.num_workers,
            collate_fn=_as_is,
            pin_memory=self.device.type == "cuda",
            # Its own generator: creating an iterator would otherwise draw a worker seed from the
            # global torch RNG, and a resumed run creates its first iterator at another moment.
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    # -- one micro-batch and one update ------------------------------------------------------------

    def _forward_backward(self, batch: Mapping[str, Any], sync_gradients: bool) -> dict[str, torch.Tensor | None]:
        if not isinstance(batch, Mapping):
            raise TypeError(f"collate_fn must return a dict of tensors, got {type(batch).__name__}")
        inputs = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                  for k, v in model_inputs(batch).items()}
        no_sync = self.dist.enabled and not sync_gradients
        with self.ddp_model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast("cuda", dtype=torch.float16 if self.use_fp16 else torch.bfloat16,
                                enabled=self.use_bf16 or self.use_fp16):
                output = self.ddp_model(**inputs)
            components = loss_components(output)
            loss = components.get("loss")
            if loss is None:
                raise ValueError(
                    f"the model returned no loss for a batch with keys {sorted(inputs)}; are its labels in the batch?"
                )
            self.scaler.scale(loss / self.config.grad_accum_steps).backward()
        return {name: None if value is None else value.detach().float() for name, value in components.items()}

    def _optimizer_step(self) -> float | None:
        grad_norm = scaled_optimizer_step(self.optimizer, self.scaler, self.model.parameters(), self.config.max_grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return grad_norm

    def _reduce_step_stats(
        self, sums: Mapping[str, tuple[torch.Tensor | float, int]], examples: int
    ) -> tuple[dict[str, float | None], int]:
        """Mean of each loss component over this update's micro-batches and all ranks, and the examples."""
        names = sorted(sums)  # the same on every rank: the fields of the model's output class
        packed = [
            torch.as_tensor(value, dtype=torch.float64, device=self.device) for name in names for value in sums[name]
        ]
        packed.append(torch.tensor(float(examples), dtype=torch.float64, device=self.device))
        stats = torch.stack(packed)
        if self.dist.enabled:
            dist.all_reduce(stats)
        stats = stats.tolist()
        means = {}
        for i, name in enumerate(names):
            total, count = stats[2 * i], stats[2 * i + 1]
            means[name] = total / count if count else None
        return means, int(stats[-1])

    def _record(self, values: Mapping[str, float | None]) -> None:
        length = len(self.history.get("loss", []))
        for name, value in values.items():
            if value is not None:  # a component the model never returned gets no series
                self.history.setdefault(name, [None] * length)
        for name, series in self.history.items():
            series.append(values.get(name))

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint(self.output_dir / CHECKPOINT_NAME)
        else:
            seed_everything(cfg.seed + self.dist.rank)  # dropout noise differs per rank
        if cfg.save_rank_weights:
            self.save_rank_weights()

        writer = self._summary_writer()
        progress = self._progress_bar()
        self.ddp_model.train()
        sums: dict[str, tuple[torch.Tensor | float, int]] = {}  # loss component -> (sum, micro-batches)
        micro_batches, examples = 0, 0
        interval_start, interval_examples = time.perf_counter(), 0
        try:
            while self.step < self.total_steps and not self.should_stop():
                for batch in self._loader(self.epoch, self.batch_in_epoch):
                    self.batch_in_epoch += 1
                    micro_batches += 1
                    sync = micro_batches == cfg.grad_accum_steps
                    for name, value in self._forward_backward(batch, sync).items():
                        total, count = sums.get(name, (0.0, 0))
                        # tensors stay on the device: no host sync per micro-batch
                        sums[name] = (total + value, count + 1) if value is not None else (total, count)
                    examples += _count_examples(batch)
                    if not sync:
                        continue

                    # the learning rate of this update for parameters with factor 1
                    lr = cfg.learning_rate * warmup_linear_decay(self.step, self.warmup_steps, self.total_steps)
                    grad_norm = self._optimizer_step()
                    means, step_examples = self._reduce_step_stats(sums, examples)
                    sums, micro_batches, examples = {}, 0, 0
                    if not math.isfinite(means["loss"]):
                        raise FloatingPointError(f"loss is {means['loss']} at update {self.step} (epoch {self.epoch})")
                    self._record({**means, "lr": lr})

                    interval_examples += step_examples
                    elapsed = time.perf_counter() - interval_start
                    throughput = interval_examples / elapsed if elapsed > 0 else 0.0
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{means['loss']:.4f}", ex_per_s=f"{throughput:.1f}", refresh=False)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        if writer is not None:
                            self._write_scalars(writer, means, lr, throughput, grad_norm)
                        if progress is None and self.dist.is_main:  # else the bar shows the loss
                            logger.info(self._log_line(means, lr, throughput))
                        interval_start, interval_examples = time.perf_counter(), 0

                    # The last update is evaluated too, so that model_best also considers the final weights.
                    if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                        self.evaluate(writer)
                    stop = self.should_stop()
                    if stop:
                        logger.info(
                            "early stopping at update %d: %s has not improved for %d evaluations (best %.4g at update %d)",
                            self.step, cfg.best_metric, self.evals_since_best, self.best_value, self.best_step,
                        )
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps and not stop:
                        self.save_checkpoint()
                    if self.step >= self.total_steps or stop:
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
            if self._last_saved_step != self.step:
                self.save_checkpoint()
            self.save_final_weights()
            if cfg.save_rank_weights:
                self.save_rank_weights()
        finally:
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()
        best = None
        if cfg.best_metric is not None:
            best = {"metric": cfg.best_metric, "mode": cfg.resolved_best_mode(), "value": self.best_value,
                    "step": self.best_step}
        result = TrainResult(self.step, self.epoch, self.history, self.eval_history, self.output_dir, best=best,
                             stopped_early=self.should_stop() and self.step < self.total_steps)
        if self.dist.created_process_group:
            self.close_distributed()
        return result

    def should_stop(self) -> bool:
        """Whether early stopping ends the run: ``early_stopping_patience`` evaluations without improvement."""
        patience = self.config.early_stopping_patience
        return patience is not None and self.evals_since_best >= patience

    def close_distributed(self) -> None:
        """Leave the process group init_distributed joined, in an order that lets gloo stop cleanly: drop
        the DDP wrapper first (its reducer holds the group and would otherwise free it during interpreter
        shutdown, after gloo's threads are gone), wait for every rank, then destroy the group."""
        global _joined_process_group
        if not (self.dist.created_process_group and dist.is_initialized()):
            return
        if self.ddp_model is not self.model:
            self.ddp_model = self.model
            gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        _joined_process_group = False

    # -- logging -------------------------------------------------------------------------------------

    def _summary_writer(self):
        if not (self.config.tensorboard and self.dist.is_main):
            return None
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when logging

        # purge_step drops events a killed run wrote after its last checkpoint.
        return SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.step or None)

    def _progress_bar(self):
        if not (self.config.progress_bar and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _log_line(self, means: Mapping[str, float | None], lr: float, throughput: float) -> str:
        """One console line per ``log_every`` updates, for runs without a progress bar (batch jobs, CI logs)."""
        components = " ".join(f"{name} {value:.4f}" for name, value in sorted(means.items())
                              if name != "loss" and value is not None)
        return (f"update {self.step}/{self.total_steps} epoch {self.epoch} | loss {means['loss']:.4f}"
                + (f" ({components})" if components else "") + f" | lr {lr:.3g} | {throughput:.1f} examples/s")

    def _write_scalars(self, writer, means, lr, throughput, grad_norm) -> None:
        for name, value in means.items():
            if value is not None:
                writer.add_scalar(f"train/{name}", value, self.step)
        writer.add_scalar("train/lr", lr, self.step)
        writer.add_scalar("train/examples_per_second", throughput, self.step)
        if grad_norm is not None:
            writer.add_scalar("train/grad_norm", grad_norm, self.step)

    # -- evaluation and saving -----------------------------------------------------------------------

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[nn.Module]:
        """The bare model holding the EMA weights (when EMA is on) inside the block, then restored."""
        if self.ema is None:
            yield self.model
            return
        backup = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        self.ema.copy_to(self.model)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(backup)

    def evaluate(self, writer=None) -> dict[str, float] | None:
        """Run ``eval_fn`` on rank 0 (EMA weights, eval mode, no grad); the training RNG is untouched.

        The metrics go to the history, TensorBoard (``val/<metric>``) and one console line; with
        ``best_metric`` set, an improvement replaces ``model_best/`` and anything else counts towards
        early stopping."""
        if self.eval_fn is None:
            return None
        metrics = None
        if self.dist.is_main:
            with self.averaged_weights() as model, seeded_rng(self.config.seed), torch.no_grad():
                model.eval()
                try:
                    metrics = {name: float(value) for name, value in self.eval_fn(model).items()}
                finally:
                    model.train()
                # inside the block: model_best must hold the weights just evaluated (EMA ones with EMA)
                improved = self._track_best(metrics, model) if self.config.best_metric else False
            self.eval_history.append({"step": self.step, **metrics})
            shown = " ".join(f"{name} {value:.4g}" for name, value in metrics.items())
            logger.info("validation at update %d: %s%s", self.step, shown, " (new best)" if improved else "")
            if writer is not None:
                for name, value in metrics.items():
                    writer.add_scalar(f"val/{name}", value, self.step)
                writer.flush()  # someone is watching: show the point now, not at the next flush
            atomic_write_json({**self.history, "eval": self.eval_history}, self.output_dir / HISTORY_NAME)
        if self.dist.enabled:
            # every rank must agree on early stopping: rank 0 alone evaluated
            counter = torch.tensor([self.evals_since_best], device=self.device)
            dist.broadcast(counter, src=0)
            self.evals_since_best = int(counter.item())
        return metrics

    def _track_best(self, metrics: Mapping[str, float], model: nn.Module) -> bool:
        """Compare with the best evaluation so far; on improvement write ``model_best/`` (before the state
        changes: a failed save leaves the previous best folder and state). Returns whether it improved."""
        name = self.config.best_metric
        if name not in metrics:
            raise ValueError(f"best_metric {name!r} is not among the evaluation's metrics ({', '.join(metrics)})")
        value = metrics[name]
        if self.config.resolved_best_mode() == "max":
            improved = math.isfinite(value) and (self.best_value is None or value > self.best_value)
        else:
            improved = math.isfinite(value) and (self.best_value is None or value < self.best_value)
        if not improved:
            self.evals_since_best += 1
            return False
        files.replace_folder(self.output_dir / BEST_MODEL_DIR, lambda folder: self.save_best(model, folder))
        self.best_value, self.best_step, self.evals_since_best = value, self.step, 0
        return True

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        state = rng_state()
        if not self.dist.enabled:
            return [state]
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, state)
        return gathered

    def save_checkpoint(self) -> Path | None:
        """Write the full training state (all ranks must call this; rank 0 writes)."""
        rng_states = self._gather_rng_states()
        self._last_saved_step = self.step
        if not self.dist.is_main:
            return None
        path = self.output_dir / CHECKPOINT_NAME
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.use_fp16 else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.dist.world_size,
            "rng_states": rng_states,
            "train_config": self.config.to_dict(),
            "history": self.history,
            "eval_history": self.eval_history,
            "best": {"value": self.best_value, "step": self.best_step, "evals_since_best": self.evals_since_best},
        }
        if self.config.keep_checkpoints:
            numbered = self.output_dir / NUMBERED_CHECKPOINT.format(step=self.step)
            atomic_torch_save(state, numbered)
            files.atomic_link(numbered, path)  # checkpoint.pt: the latest, what --resume reads
            self._delete_old_checkpoints()
        else:
            atomic_torch_save(state, path)
        atomic_write_json({**self.history, "eval": self.eval_history}, self.output_dir / HISTORY_NAME)
        return path

    def _delete_old_checkpoints(self) -> None:
        """Keep the ``keep_checkpoints`` newest numbered checkpoints up to this update. Newer numbers are
        left over from a run that was killed and resumed from an earlier checkpoint: this run is
        rewriting that stretch, so they go too."""
        numbered = {}
        for candidate in self.output_dir.glob("checkpoint-*.pt"):
            match = re.fullmatch(r"checkpoint-(\d+)\.pt", candidate.name)
            if match:
                numbered[int(match.group(1))] = candidate
        kept = sorted(step for step in numbered if step <= self.step)[-self.config.keep_checkpoints :]
        for step, candidate in numbered.items():
            if step not in kept:
                candidate.unlink(missing_ok=True)

    def load_checkpoint(self, path: Path) -> None:
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
        saved_config = state["train_config"]
        mismatched = {
            key: (saved_config.get(key), getattr(self.config, key))
            for key in _RESUME_INVARIANTS
            if saved_config.get(key) != getattr(self.config, key)
        }
        if state["world_size"] != self.dist.world_size:
            mismatched["world_size"] = (state["world_size"], self.dist.world_size)
        if mismatched:
            details = ", ".join(f"{key}: checkpoint {old!r} vs now {new!r}" for key, (old, new) in mismatched.items())
            raise ValueError(f"{path}: cannot continue the same run with different settings ({details})")
        changed = [key for key, value in self.config.to_dict().items() if saved_config.get(key) != value]
        if changed:
            logger.warning("resuming %s with changed settings: %s", path, ", ".join(changed))

        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError(f"{path}: EMA is on but the checkpoint holds no EMA weights")
            self.ema.load_state_dict(state["ema"])
        if self.use_fp16 and state.get("scaler"):  # a run that switched to fp16 starts with a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = {name: list(series) for name, series in state["history"].items()}
        self.eval_history = list(state["eval_history"])
        best = state.get("best") or {}  # absent in checkpoints written before model_best existed
        self.best_value, self.best_step = best.get("value"), best.get("step")
        self.evals_since_best = best.get("evals_since_best", 0)
        self._last_saved_step = self.step
        set_rng_state(state["rng_states"][self.dist.rank])

    def save_rank_weights(self) -> Path:
        """This rank's current (not averaged) weights to ``rank_weights/rank{r}_step{n}.safetensors``."""
        from safetensors.torch import save_file

        path = self.output_dir / "rank_weights" / f"rank{self.dist.rank}_step{self.step}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        # clone: safetensors refuses tensors that share storage (tied weights)
        save_file({name: value.detach().cpu().clone() for name, value in self.model.state_dict().items()}, str(path))
        return path

    def save_final_weights(self) -> Path | None:
        """Rank 0 writes the model's state dict (EMA weights when EMA is on) to ``model.pt``."""
        if not self.dist.is_main:
            return None
        path = self.output_dir / FINAL_WEIGHTS_NAME
        with self.averaged_weights() as model:
            atomic_torch_save(model.state_dict(), path)
        return path


def train(
    model: nn.Module,
    train_dataset: Dataset,
    config: TrainConfig,
    collate_fn: Callable[[list[Any]], Mapping[str, Any]] | None = None,
    resume: bool = False,
    lr_multiplier_for: Callable[[str], float] | None = None,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
) -> TrainResult:
    """Build a :class:`Trainer` and run it; ``resume=True`` continues from ``output_dir/checkpoint.pt``."""
    trainer = Trainer(model, train_dataset, config, collate_fn, lr_multiplier_for, eval_fn)
    return trainer.fit(resume=resume)
