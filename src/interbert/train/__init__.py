"""The one training loop shared by every recipe (pretraining, retrieval fine-tuning, VCR, text tasks).

The loop knows nothing about InterBERT: it trains any ``nn.Module`` whose ``forward(**batch)`` returns
an object with a scalar ``.loss`` (a dataclass, e.g. a transformers ``ModelOutput``). Every other
dataclass field whose name ends in ``_loss`` is logged as a loss component.

One module per job:

==================  ==========================================================================
``config``          :class:`TrainConfig` (the ``train:`` section of a recipe), :class:`TrainResult`
``loop``            :class:`Trainer`: steps, gradient accumulation, clipping, AMP; :func:`train`
``optim``           parameter groups (weight decay, learning-rate factors), the scaled update
``schedule``        linear warm-up then linear decay, a torch ``LambdaLR``
``ema``             the exponential moving average of the weights (torch ``AveragedModel``)
``evaluation``      validation as a callback: best model (``model_best/``), early stopping
``checkpoint``      checkpoints (save, resume, keep-K), history, final weights; crash-safe writes
``distributed``     the process group torchrun describes, DDP, rank 0 first
``sampler``         the seeded data order and seeded batch building
``rng``             python/numpy/torch RNG seeding, saving and restoring
``reporting``       progress bar, the ``report_to`` trackers, console lines
``tracking``        ``train.report_to``: TensorBoard, W&B and MLflow runs (hparams, scalars, outcome)
``curves``          ``curves.png``: a run's losses and validation metrics; the demo's loss comparison
``compiling``       ``train.compile``: the step through torch.compile, and its compile time
==================  ==========================================================================

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

Every name below was importable from ``interbert.train`` when it was one module, and still is.
"""

from interbert.train.checkpoint import (
    BEST_MODEL_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    FINAL_WEIGHTS_NAME,
    HISTORY_NAME,
    NUMBERED_CHECKPOINT,
    atomic_torch_save,
    atomic_write_json,
    save_weights_folder,
)
from interbert.train.config import TrainConfig, TrainResult
from interbert.train.distributed import DistributedContext, init_distributed, main_process_first
from interbert.train.ema import ExponentialMovingAverage
from interbert.train.loop import Trainer, loss_components, train
from interbert.train.optim import (
    build_param_groups,
    enable_gradient_checkpointing,
    freeze_unused_parameters,
    lr_multiplier_from_patterns,
    scaled_optimizer_step,
)
from interbert.train.rng import batch_seed, rng_state, seed_everything, seeded_rng, set_rng_state
from interbert.train.sampler import _SeededBatches, epoch_batches  # noqa: F401 -- benchmarks/profile_loop.py wraps it
from interbert.train.schedule import warmup_linear_decay
from interbert.utils.device import checked_device, resolve_device

__all__ = [
    "BEST_MODEL_DIR",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "FINAL_WEIGHTS_NAME",
    "HISTORY_NAME",
    "NUMBERED_CHECKPOINT",
    "DistributedContext",
    "ExponentialMovingAverage",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "atomic_torch_save",
    "atomic_write_json",
    "batch_seed",
    "build_param_groups",
    "checked_device",
    "enable_gradient_checkpointing",
    "epoch_batches",
    "freeze_unused_parameters",
    "init_distributed",
    "loss_components",
    "lr_multiplier_from_patterns",
    "main_process_first",
    "resolve_device",
    "rng_state",
    "save_weights_folder",
    "scaled_optimizer_step",
    "seed_everything",
    "seeded_rng",
    "set_rng_state",
    "train",
    "warmup_linear_decay",
]
