"""The loop: seeded batches -> forward (bf16 or fp16 autocast on CUDA only) -> backward of
``loss / grad_accum_steps`` (loss-scaled with fp16) -> after ``grad_accum_steps`` micro-batches: unscaling,
gradient clipping, AdamW, the warm-up/decay schedule, EMA -> log, validation callback, checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from interbert.data import model_inputs
from interbert.errors import UsageError
from interbert.train import checkpoint, curves, distributed, reporting, tracking
from interbert.train.checkpoint import CHECKPOINT_NAME, FINAL_WEIGHTS_NAME, atomic_torch_save, save_weights_folder
from interbert.train.compiling import CompiledStep
from interbert.train.config import TrainConfig, TrainResult
from interbert.train.curves import CURVES_NAME
from interbert.train.ema import ExponentialMovingAverage, averaged_weights
from interbert.train.evaluation import BestModel, Validation
from interbert.train.optim import (
    build_optimizer,
    enable_gradient_checkpointing,
    freeze_unused_parameters,
    lr_multiplier_from_patterns,
    mixed_precision,
    scaled_optimizer_step,
)
from interbert.train.rng import rng_state, seed_everything, set_rng_state
from interbert.train.sampler import epoch_batches, seeded_loader
from interbert.train.schedule import warmup_linear_decay, warmup_linear_schedule
from interbert.utils.device import resolve_device

logger = logging.getLogger(__name__)


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


def _count_examples(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError(f"cannot tell the batch size: no tensor in the batch (keys {sorted(batch)})")


class _Accumulated:
    """What the micro-batches of the current update have added up; the loss sums stay on the device (no
    host sync per micro-batch)."""

    def __init__(self):
        self.sums: dict[str, tuple[torch.Tensor | float, int]] = {}  # loss component -> (sum, micro-batches)
        self.micro_batches, self.examples = 0, 0

    def add(self, components: Mapping[str, torch.Tensor | None], examples: int) -> None:
        for name, value in components.items():
            total, count = self.sums.get(name, (0.0, 0))
            self.sums[name] = (total + value, count + 1) if value is not None else (total, count)
        self.examples += examples


def reduce_step_stats(
    sums: Mapping[str, tuple[torch.Tensor | float, int]], examples: int, device: torch.device, all_ranks: bool
) -> tuple[dict[str, float | None], int]:
    """Mean of each loss component over an update's micro-batches (and all ranks), and the examples."""
    names = sorted(sums)  # the same on every rank: the fields of the model's output class
    packed = [torch.as_tensor(value, dtype=torch.float64, device=device) for name in names for value in sums[name]]
    packed.append(torch.tensor(float(examples), dtype=torch.float64, device=device))
    stats = torch.stack(packed)
    if all_ranks:
        dist.all_reduce(stats)
    stats = stats.tolist()  # the one host sync of an update
    means = {}
    for i, name in enumerate(names):
        total, count = stats[2 * i], stats[2 * i + 1]
        means[name] = total / count if count else None
    return means, int(stats[-1])


def append_to_history(history: dict[str, list[float | None]], values: Mapping[str, float | None]) -> None:
    """One update's values; a component the model never returned gets no series, one that appears late
    is padded with None for the updates before."""
    length = len(history.get("loss", []))
    for name, value in values.items():
        if value is not None:
            history.setdefault(name, [None] * length)
    for name, series in history.items():
        series.append(values.get(name))


def count_updates(config: TrainConfig, batches_per_epoch: int, examples: int, world_size: int) -> int:
    """Optimizer updates in the run: ``max_steps``, or what ``num_epochs`` of this rank's batches make."""
    if batches_per_epoch == 0:
        raise UsageError(f"no full batch: {examples} examples over {world_size} process(es) "
                         f"with batch_size {config.batch_size}")
    if config.max_steps is not None:
        return config.max_steps
    total = config.num_epochs * batches_per_epoch // config.grad_accum_steps
    if total == 0:
        raise UsageError(f"{config.num_epochs} epoch(s) of {batches_per_epoch} batches make no update "
                         f"with grad_accum_steps {config.grad_accum_steps}; set max_steps")
    return total


class Trainer:
    """Train ``model`` on ``train_dataset``; see :mod:`interbert.train` for the contract.

    ``collate_fn`` turns a list of dataset items into a ``dict`` batch: every key is passed to the model's
    forward except ``meta`` (:data:`interbert.data.META`), the bookkeeping such as ``image_ids``, so
    a key the model does not take is a TypeError, not dropped. ``lr_multiplier_for(name)`` gives
    a parameter's learning-rate factor (e.g. 0.1 for BERT-initialised weights); it replaces
    ``config.lr_multipliers``. ``eval_fn(model) -> {metric: value}`` runs on rank 0 every
    ``eval_every`` updates, in eval mode, without gradients, with the EMA weights when EMA is on.
    ``save_best(model, folder)`` writes the model that scored best on ``config.best_metric`` into an
    empty folder (default: ``save_pretrained`` when the model has it, else ``model.pt``); the loop
    puts the folder in place as ``model_best/`` only once it is complete. A ``save_best`` with an
    ``evaluation`` parameter also gets ``{"step", "validation", "selected_by"}`` (for the model card).
    ``hparams``: the run's resolved
    settings (a recipe's ``model``/``data`` sections) that the ``report_to`` trackers record beside ``train``.

    About 330 lines: set-up, the loop and resume/save stay together because they share the run's position;
    what has state of its own (validation, best model, EMA, compiling, reporting) lives in the modules beside.
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
        hparams: Mapping[str, Any] | None = None,
    ):
        if lr_multiplier_for is not None and config.lr_multipliers:
            raise ValueError("give either lr_multiplier_for or config.lr_multipliers, not both")
        if config.early_stopping_patience is not None and config.best_metric is None:
            raise ValueError("early_stopping_patience needs best_metric: the metric whose improvement it waits for")
        if config.eval_every is not None and eval_fn is None and config.best_metric is not None:
            raise ValueError("best_metric is set but there is no eval_fn to compute it")
        tracking.require_backends(config.reporting_backends())  # before any work, on every rank
        self.config = config
        self.hparams = dict(hparams or {})
        self.output_dir = Path(config.output_dir)
        self.train_dataset = train_dataset
        self.collate_fn = collate_fn or default_collate
        self.eval_fn = eval_fn
        self.device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = distributed.init_distributed(self.device)
        self._setup_precision(model)
        self._setup_model(model, lr_multiplier_for)
        self._setup_steps()
        self.compiled = CompiledStep(config.compile, self.device)  # train.compile
        self.ddp_model = self.compiled.wrap(self.model, self.ddp_model, self.collate_fn)
        self.best = BestModel(config.best_metric, config.resolved_best_mode(), config.early_stopping_patience,
                              self.output_dir / checkpoint.BEST_MODEL_DIR, save_best or save_weights_folder)
        self.validation = Validation(eval_fn, config.eval_every, config.seed, self.best)
        # Position in the run: updates done, and the next batch to read.
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: dict[str, list[float | None]] = {}
        self.eval_history: list[dict[str, float]] = []
        self._last_saved_step = -1

    # -- set-up ------------------------------------------------------------------------------------

    def _setup_precision(self, model: nn.Module) -> None:
        self.use_bf16, self.use_fp16, self.scaler = mixed_precision(self.config.bf16, self.config.fp16, self.device)
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(model)

    def _setup_model(self, model: nn.Module, lr_multiplier_for: Callable[[str], float] | None) -> None:
        config = self.config
        self.model = model.to(self.device)  # the bare module: names, EMA, saving
        frozen = freeze_unused_parameters(self.model)
        if frozen:
            modules = sorted({".".join(name.split(".")[:2]) for name in frozen})
            logger.info("no loss reaches %d parameter tensors; frozen: %s", len(frozen), ", ".join(modules))
        multiplier = lr_multiplier_for or lr_multiplier_from_patterns(config.lr_multipliers)
        self.optimizer = build_optimizer(self.model, config, multiplier, self.device)

    def _setup_steps(self) -> None:
        """Updates in the run, the schedule over them, EMA and the DDP wrapper."""
        config = self.config
        self.batches_per_epoch = len(self._epoch_batches(0))
        self.total_steps = count_updates(config, self.batches_per_epoch, len(self.train_dataset), self.dist.world_size)
        self.warmup_steps = config.warmup_steps or round(config.warmup_ratio * self.total_steps)
        self.scheduler = warmup_linear_schedule(self.optimizer, self.warmup_steps, self.total_steps)
        self.ema = (
            ExponentialMovingAverage(self.model, config.ema_decay, config.ema_warmup) if config.ema_decay else None
        )
        self.ddp_model = distributed.wrap_for_ddp(self.model, self.dist, self.device, config.find_unused_parameters)

    @property
    def compile_seconds(self) -> float | None:
        """The time ``train.compile`` spent compiling (None: off, or not known yet)."""
        return self.compiled.seconds

    # -- data ------------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        cfg = self.config
        return epoch_batches(
            self.train_dataset, cfg.batch_size, epoch, cfg.seed, self.dist.rank, self.dist.world_size, cfg.drop_last
        )

    def _loader(self, epoch: int, start: int) -> DataLoader:
        if hasattr(self.train_dataset, "set_epoch"):  # datasets that seed their own masking per (epoch, index)
            self.train_dataset.set_epoch(epoch)
        return seeded_loader(
            self.train_dataset, self._epoch_batches(epoch), self.collate_fn, seed=self.config.seed, epoch=epoch,
            rank=self.dist.rank, start=start, progress=(self.batches_per_epoch, self.config.grad_accum_steps,
                                                        self.total_steps),
            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
        )

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainResult:
        self._start(resume)
        reporter = self._reporter(resume)
        self.ddp_model.train()
        status = tracking.FAILED  # until the loop ends normally
        try:
            self._loop(reporter)
            if self.compiled.finish() is not None:
                reporter.log({"train/compile_seconds": self.compile_seconds}, self.step)
            self._finish()
            status = tracking.FINISHED
        except KeyboardInterrupt:
            status = tracking.KILLED
            raise
        finally:
            if status != tracking.FINISHED and self.dist.is_main:  # a diverged run is when one looks at them
                curves.write_curves_after_failure(self.output_dir / CURVES_NAME, self.history, self.eval_history)
            reporter.close(status)
        result = TrainResult(self.step, self.epoch, self.history, self.eval_history, self.output_dir,
                             best=self.best.summary(), stopped_early=self.should_stop() and self.step < self.total_steps,
                             compile_seconds=self.compile_seconds)
        if self.dist.created_process_group:
            self.close_distributed()
        self.compiled.restore(self.model)
        return result

    def _loop(self, reporter: reporting.Reporter) -> None:
        cfg = self.config
        acc = _Accumulated()
        while self.step < self.total_steps and not self.should_stop():
            for batch in self._loader(self.epoch, self.batch_in_epoch):
                self.batch_in_epoch += 1
                acc.micro_batches += 1
                sync = acc.micro_batches == cfg.grad_accum_steps
                acc.add(self.compiled.timed(self._forward_backward, batch, sync), _count_examples(batch))
                if not sync:
                    continue
                self._update(acc, reporter)
                if self._after_update(reporter):
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0

    def _reporter(self, resume: bool) -> reporting.Reporter:
        """The bar and the ``report_to`` trackers, given the run's settings: the recipe's (``hparams``) with
        the loop's as this run uses them."""
        cfg = self.config
        metric_tags = ["train/loss"] + ([f"val/{cfg.best_metric}"] if cfg.best_metric else [])
        return reporting.Reporter(self.output_dir, self.step, self.total_steps, cfg.log_every, bar=cfg.progress_bar,
                                  is_main=self.dist.is_main, report_to=cfg.reporting_backends(),
                                  hparams={**self.hparams, "train": cfg.to_dict()}, metric_tags=metric_tags,
                                  resume=resume)

    def _start(self, resume: bool) -> None:
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint(self.output_dir / CHECKPOINT_NAME)
        else:
            seed_everything(self.config.seed + self.dist.rank)  # dropout noise differs per rank
        if self.config.save_rank_weights:
            self.save_rank_weights()

    def _update(self, acc: _Accumulated, reporter: reporting.Reporter) -> None:
        """The optimizer step that ends an update, then its losses into the history and the reports."""
        # the learning rate of this update for parameters with factor 1
        lr = self.config.learning_rate * warmup_linear_decay(self.step, self.warmup_steps, self.total_steps)
        grad_norm = self._optimizer_step()
        means, step_examples = self._reduce_step_stats(acc.sums, acc.examples)
        acc.sums, acc.micro_batches, acc.examples = {}, 0, 0
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"loss is {means['loss']} at update {self.step} (epoch {self.epoch})")
        append_to_history(self.history, {**means, "lr": lr})
        reporter.update(self.step, self.epoch, means, lr, step_examples, grad_norm)

    def _after_update(self, reporter: reporting.Reporter) -> bool:
        """The callbacks after an update: validation (best model, early stopping), then a checkpoint.
        Returns whether the run ends here."""
        if self.validation.due(self.step, self.total_steps):
            self.evaluate(reporter)
        stop = self.should_stop()
        if stop:
            logger.info(
                "early stopping at update %d: %s has not improved for %d evaluations (best %.4g at update %d)",
                self.step, self.config.best_metric, self.best.evals_since_best, self.best.value, self.best.step,
            )
        save_every = self.config.save_every
        if save_every and self.step % save_every == 0 and self.step < self.total_steps and not stop:
            self.save_checkpoint()
        return self.step >= self.total_steps or stop

    def _finish(self) -> None:
        if self._last_saved_step != self.step:
            self.save_checkpoint()
        self.save_final_weights()
        if self.dist.is_main:
            curves.write_run_curves(self.output_dir / CURVES_NAME, self.history, self.eval_history)
        if self.config.save_rank_weights:
            self.save_rank_weights()

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
        return reduce_step_stats(sums, examples, self.device, self.dist.enabled)

    # -- evaluation (the validation callback) --------------------------------------------------------

    def averaged_weights(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The bare model holding the EMA weights (when EMA is on) inside the block, then restored."""
        return averaged_weights(self.model, self.ema)

    def evaluate(self, reporter: reporting.Reporter | None = None) -> dict[str, float] | None:
        """Run ``eval_fn`` on rank 0 (:class:`~interbert.train.evaluation.Validation`); its metrics go to
        ``reporter``'s trackers."""
        return self.validation(self, reporter)

    def should_stop(self) -> bool:
        """Whether early stopping ends the run: ``early_stopping_patience`` evaluations without improvement."""
        return self.best.should_stop()

    # what the loop's own attributes were before BestModel held them
    best_value = property(lambda self: self.best.value)
    best_step = property(lambda self: self.best.step)
    evals_since_best = property(lambda self: self.best.evals_since_best)

    # -- saving and resuming -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write the full training state (all ranks must call this; rank 0 writes)."""
        rng_states = distributed.all_gather_objects(self.dist, rng_state())
        self._last_saved_step = self.step
        if not self.dist.is_main:
            return None
        state = {
            "format": checkpoint.CHECKPOINT_FORMAT,
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
            "best": self.best.state_dict(),
        }
        path = checkpoint.write_checkpoint(state, self.output_dir, self.step, self.config.keep_checkpoints)
        checkpoint.write_history(self.output_dir, self.history, self.eval_history)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = checkpoint.read_checkpoint(path)
        checkpoint.check_same_run(state, self.config, self.dist.world_size, path)
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
        self.best.load_state_dict(state.get("best"))
        self._last_saved_step = self.step
        set_rng_state(state["rng_states"][self.dist.rank])

    def save_rank_weights(self) -> Path:
        """This rank's current (not averaged) weights to ``rank_weights/rank{r}_step{n}.safetensors``."""
        return checkpoint.save_rank_weights(self.model, self.output_dir, self.dist.rank, self.step)

    def save_final_weights(self) -> Path | None:
        """Rank 0 writes the model's state dict (EMA weights when EMA is on) to ``model.pt``."""
        if not self.dist.is_main:
            return None
        path = self.output_dir / FINAL_WEIGHTS_NAME
        with self.averaged_weights() as model:
            atomic_torch_save(model.state_dict(), path)
        return path

    def close_distributed(self) -> None:
        """Leave the process group init_distributed joined (:func:`~interbert.train.distributed.leave_distributed`),
        dropping the DDP wrapper first."""
        if not distributed.owns_process_group(self.dist):
            return
        if self.ddp_model is not self.model:
            self.ddp_model = self.model
            gc.collect()
        distributed.leave_distributed(self.dist)


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
