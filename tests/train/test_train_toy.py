"""A toy model and data set for the training-loop tests, and a script that trains them.

The other ``test_train*`` modules import the toy from here; the distributed and resume tests run
this file as a script in subprocesses (``python tests/train/test_train_toy.py --output-dir D ...``, or under
``torchrun``). The toy has what makes resuming hard: dropout (training RNG), random noise in
``__getitem__`` (torch RNG) and in the collate function (numpy RNG), LayerNorm and bias parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from interbert.train import Trainer, TrainConfig


@dataclass
class ToyOutput:
    loss: torch.Tensor
    regression_loss: torch.Tensor
    penalty_loss: torch.Tensor | None
    predictions: torch.Tensor


class ToyModel(nn.Module):
    def __init__(self, in_features: int = 8, hidden: int = 16, dropout: float = 0.1):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, 1)
        self.seen_example_indices: list[int] = []

    def forward(self, features, targets, example_index=None) -> ToyOutput:
        if example_index is not None:
            self.seen_example_indices.extend(example_index.tolist())
        predictions = self.head(self.encoder(features)).squeeze(-1)
        regression_loss = nn.functional.mse_loss(predictions, targets)
        penalty_loss = 1e-3 * predictions.pow(2).mean()
        return ToyOutput(regression_loss + penalty_loss, regression_loss, penalty_loss, predictions)


class ToyDataset(Dataset):
    """``target = features @ w + noise``; the noise is drawn from the global torch RNG per item."""

    def __init__(self, size: int = 64, in_features: int = 8, noise: float = 0.1):
        generator = torch.Generator().manual_seed(1234)
        self.features = torch.randn(size, in_features, generator=generator)
        self.targets = self.features @ torch.randn(in_features, generator=generator)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        target = self.targets[index] + self.noise * torch.randn(())
        return {"features": self.features[index], "targets": target, "example_index": index}


def noisy_collate(items: list[dict]) -> dict:
    """default_collate plus numpy-RNG jitter, to check that the numpy state is restored too."""
    batch = default_collate(items)
    batch["features"] = batch["features"] + torch.from_numpy(0.01 * np.random.randn(*batch["features"].shape)).float()
    return batch


class KillAfterCheckpoint(Trainer):
    """A Trainer that dies like a pre-empted job (SIGKILL, no cleanup) right after one checkpoint."""

    kill_after_step: int | None = None

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == self.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum-steps", type=int, default=1)
    parser.add_argument("--dataset-size", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=None)
    parser.add_argument("--ema-decay", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--kill-after-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    # evaluations whose score only falls after the first: early stopping after --patience of them
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--report-to", nargs="+", default=None, help="train.report_to")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on every rank and in every run
    config = TrainConfig(
        output_dir=args.output_dir,
        seed=7,
        batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum_steps,
        max_steps=args.max_steps,
        learning_rate=1e-2,
        warmup_steps=args.warmup_steps,
        save_every=args.save_every,
        ema_decay=args.ema_decay,
        num_workers=args.num_workers,
        log_every=1,
        progress_bar=False,
        eval_every=args.eval_every,
        best_metric="score" if args.eval_every else None,
        early_stopping_patience=args.patience,
        report_to=args.report_to,
    )
    model = ToyModel()
    trainer = KillAfterCheckpoint(model, ToyDataset(args.dataset_size), config, collate_fn=noisy_collate,
                                  eval_fn=lambda evaluated: {"score": -float(trainer.step)},
                                  hparams={"model": {"name": "toy"}})
    trainer.kill_after_step = args.kill_after_step
    rank = trainer.dist.rank
    result = trainer.fit(resume=args.resume)
    torch.save(model.state_dict(), os.path.join(args.output_dir, f"weights_rank{rank}.pt"))
    with open(os.path.join(args.output_dir, f"run_rank{rank}.json"), "w") as handle:
        json.dump({"seen": model.seen_example_indices, "loss_history": result.loss_history}, handle)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_training_reduces_the_loss_of_a_learnable_task(tmp_path):
    config = TrainConfig(
        output_dir=str(tmp_path), batch_size=8, max_steps=100, learning_rate=3e-2, progress_bar=False, tensorboard=False
    )
    result = Trainer(ToyModel(dropout=0.0), ToyDataset(64, noise=0.0), config).fit()
    first, last = np.mean(result.loss_history[:5]), np.mean(result.loss_history[-5:])
    assert last < 0.2 * first
    assert set(result.history) == {"loss", "regression_loss", "penalty_loss", "lr"}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
