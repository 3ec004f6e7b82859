"""What a run shows while it trains: a progress bar, TensorBoard scalars and, without a bar, one console
line every ``log_every`` updates. Only rank 0 reports."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)


def summary_writer(output_dir: Path, step: int):
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when logging

    # purge_step drops events a killed run wrote after its last checkpoint.
    return SummaryWriter(str(output_dir / "tensorboard"), purge_step=step or None)


def progress_bar(total_steps: int, step: int):
    from tqdm import tqdm

    return tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)


def log_line(step: int, total_steps: int, epoch: int, means: Mapping[str, float | None], lr: float,
             throughput: float) -> str:
    """One console line per ``log_every`` updates, for runs without a progress bar (batch jobs, CI logs)."""
    components = " ".join(f"{name} {value:.4f}" for name, value in sorted(means.items())
                          if name != "loss" and value is not None)
    return (f"update {step}/{total_steps} epoch {epoch} | loss {means['loss']:.4f}"
            + (f" ({components})" if components else "") + f" | lr {lr:.3g} | {throughput:.1f} examples/s")


def write_scalars(writer, step: int, means: Mapping[str, float | None], lr: float, throughput: float,
                  grad_norm: float | None) -> None:
    for name, value in means.items():
        if value is not None:
            writer.add_scalar(f"train/{name}", value, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/examples_per_second", throughput, step)
    if grad_norm is not None:
        writer.add_scalar("train/grad_norm", grad_norm, step)


class Reporter:
    """Rank 0's progress bar, TensorBoard writer and console lines for one ``fit`` (other ranks: none of
    them); the throughput is measured over the updates since the last report."""

    def __init__(self, output_dir: Path, step: int, total_steps: int, log_every: int, *, tensorboard: bool,
                 bar: bool, is_main: bool):
        self.total_steps, self.log_every, self.is_main = total_steps, log_every, is_main
        self.writer = summary_writer(output_dir, step) if tensorboard and is_main else None
        self.progress = progress_bar(total_steps, step) if bar and is_main else None
        self.interval_start, self.interval_examples = time.perf_counter(), 0

    def update(self, step: int, epoch: int, means: Mapping[str, float | None], lr: float, examples: int,
               grad_norm: float | None) -> None:
        """After update ``step``: its mean losses, learning rate, examples (all ranks) and gradient norm."""
        self.interval_examples += examples
        elapsed = time.perf_counter() - self.interval_start
        throughput = self.interval_examples / elapsed if elapsed > 0 else 0.0
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{means['loss']:.4f}", ex_per_s=f"{throughput:.1f}", refresh=False)
        if step % self.log_every == 0 or step == self.total_steps:
            if self.writer is not None:
                write_scalars(self.writer, step, means, lr, throughput, grad_norm)
            if self.progress is None and self.is_main:  # else the bar shows the loss
                logger.info(log_line(step, self.total_steps, epoch, means, lr, throughput))
            self.interval_start, self.interval_examples = time.perf_counter(), 0

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
