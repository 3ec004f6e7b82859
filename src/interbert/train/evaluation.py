"""Validation as a callback of the loop: every ``eval_every`` updates ``eval_fn`` runs on rank 0 (EMA
weights, eval mode, no grad, a fixed RNG), its metrics are logged, and :class:`BestModel` keeps the best
weights in ``model_best/`` and counts the evaluations without improvement for early stopping."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from interbert.train.checkpoint import BEST_MODEL_DIR, write_history
from interbert.train.curves import CURVES_NAME, write_run_curves
from interbert.train.rng import seeded_rng
from interbert.utils import files

logger = logging.getLogger(__name__)


class BestModel:
    """The best value of ``metric`` so far, the update it came at, and the evaluations since (the early
    stopping counter). Saved in checkpoints, so that a resumed run keeps the same ``model_best/`` and stops
    where the uninterrupted run would."""

    def __init__(self, metric: str | None, mode: str, patience: int | None, folder: Path,
                 save: Callable[[nn.Module, Path], None]):
        self.metric, self.mode, self.patience, self.folder, self.save = metric, mode, patience, folder, save
        # a save that takes `evaluation` is told what it saves: the update, its metrics, the metric that chose it
        self._save_takes_evaluation = "evaluation" in inspect.signature(save).parameters
        self.value: float | None = None
        self.step: int | None = None
        self.evals_since_best = 0

    def observe(self, metrics: Mapping[str, float], model: nn.Module, step: int) -> bool:
        """Compare with the best evaluation so far; on improvement write ``model_best/`` (before the state
        changes: a failed save leaves the previous best folder and state). Returns whether it improved."""
        if self.metric is None:
            return False
        if self.metric not in metrics:
            raise ValueError(f"best_metric {self.metric!r} is not among the evaluation's metrics ({', '.join(metrics)})")
        value = metrics[self.metric]
        if self.mode == "max":
            improved = math.isfinite(value) and (self.value is None or value > self.value)
        else:
            improved = math.isfinite(value) and (self.value is None or value < self.value)
        if not improved:
            self.evals_since_best += 1
            return False
        evaluation = {"step": step, "validation": {"step": step, **metrics},
                      "selected_by": {"metric": self.metric, "mode": self.mode, "value": value}}
        if self._save_takes_evaluation:
            files.replace_folder(self.folder, lambda folder: self.save(model, folder, evaluation=evaluation))
        else:
            files.replace_folder(self.folder, lambda folder: self.save(model, folder))
        self.value, self.step, self.evals_since_best = value, step, 0
        return True

    def should_stop(self) -> bool:
        """Whether early stopping ends the run: ``patience`` evaluations without improvement."""
        return self.patience is not None and self.evals_since_best >= self.patience

    def share_from_main_process(self, device: torch.device) -> None:
        """Every rank must agree on early stopping: rank 0 alone evaluated."""
        counter = torch.tensor([self.evals_since_best], device=device)
        dist.broadcast(counter, src=0)
        self.evals_since_best = int(counter.item())

    def summary(self) -> dict[str, Any] | None:
        """``TrainResult.best``: None without a metric."""
        if self.metric is None:
            return None
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step}

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "step": self.step, "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        best = state or {}  # absent in checkpoints written before model_best existed
        self.value, self.step = best.get("value"), best.get("step")
        self.evals_since_best = best.get("evals_since_best", 0)


def evaluate_model(eval_fn: Callable[[nn.Module], Mapping[str, float]], model: nn.Module) -> dict[str, float]:
    """``eval_fn(model)`` in eval mode; the model is back in train mode after."""
    model.eval()
    try:
        return {name: float(value) for name, value in eval_fn(model).items()}
    finally:
        model.train()


class Validation:
    """The callback the loop calls after each update: evaluates when due, keeps the best model."""

    def __init__(self, eval_fn: Callable[[nn.Module], Mapping[str, float]] | None, every: int | None, seed: int,
                 best: BestModel):
        self.eval_fn, self.every, self.seed, self.best = eval_fn, every, seed, best

    def due(self, step: int, total_steps: int) -> bool:
        # the last update is evaluated too, so that model_best also considers the final weights
        return bool(self.every) and (step % self.every == 0 or step == total_steps)

    def __call__(self, trainer, reporter=None) -> dict[str, float] | None:
        """Evaluate ``trainer``'s averaged weights on rank 0; the metrics go to its eval history,
        ``loss_history.json`` and ``curves.png``, the ``reporter``'s trackers (``val/<metric>``) and one
        console line."""
        if self.eval_fn is None:
            return None
        metrics = None
        if trainer.dist.is_main:
            # a fixed RNG: the training RNG is untouched, and evaluations repeat after a resume
            with trainer.averaged_weights() as model, seeded_rng(self.seed), torch.no_grad():
                metrics = evaluate_model(self.eval_fn, model)
                # inside the block: model_best must hold the weights just evaluated (EMA ones with EMA)
                improved = self.best.observe(metrics, model, trainer.step)
            trainer.eval_history.append({"step": trainer.step, **metrics})
            shown = " ".join(f"{name} {value:.4g}" for name, value in metrics.items())
            logger.info("validation at update %d: %s%s", trainer.step, shown, " (new best)" if improved else "")
            if reporter is not None:
                reporter.validation(trainer.step, metrics)
            write_history(trainer.output_dir, trainer.history, trainer.eval_history)
            write_run_curves(trainer.output_dir / CURVES_NAME, trainer.history, trainer.eval_history)
        if trainer.dist.enabled:
            self.best.share_from_main_process(trainer.device)
        return metrics
