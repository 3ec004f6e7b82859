"""What a run shows while it trains: a progress bar, the trackers of ``train.report_to`` (TensorBoard,
W&B, MLflow: :mod:`interbert.train.tracking`) and, without a bar, one console line every ``log_every``
updates. Only rank 0 reports."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from interbert.train import tracking

logger = logging.getLogger(__name__)


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


def train_scalars(means: Mapping[str, float | None], lr: float, throughput: float,
                  grad_norm: float | None) -> dict[str, float]:
    """An update's scalars under the names every tracker gets: ``train/<loss>``, ``train/lr``, ..."""
    scalars = {f"train/{name}": value for name, value in means.items() if value is not None}
    scalars.update({"train/lr": lr, "train/examples_per_second": throughput})
    if grad_norm is not None:
        scalars["train/grad_norm"] = grad_norm
    return scalars


class Reporter:
    """Rank 0's progress bar, trackers and console lines for one ``fit`` (other ranks: none of them); the
    throughput is measured over the updates since the last report.

    ``report_to``: the trackers (``TrainConfig.reporting_backends()``); ``hparams``: the run's resolved
    settings they record; ``metric_tags``: the scalars TensorBoard's HParams dashboard compares runs by;
    ``resume``: go on in the W&B and MLflow runs of the checkpoint's run."""

    def __init__(self, output_dir: Path, step: int, total_steps: int, log_every: int, *, bar: bool, is_main: bool,
                 report_to: Sequence[str] = (), hparams: Mapping[str, Any] | None = None,
                 metric_tags: Sequence[str] = ("train/loss",), resume: bool = False):
        self.total_steps, self.log_every, self.is_main = total_steps, log_every, is_main
        self.trackers = tracking.open_trackers(report_to, output_dir, step, hparams or {}, metric_tags,
                                               resume) if is_main else []
        # the TensorBoard SummaryWriter, for callers that add their own summaries (None: not reporting to it)
        self.writer = next((t.writer for t in self.trackers if isinstance(t, tracking.TensorBoardTracker)), None)
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
            self.log(train_scalars(means, lr, throughput, grad_norm), step)
            if self.progress is None and self.is_main:  # else the bar shows the loss
                logger.info(log_line(step, self.total_steps, epoch, means, lr, throughput))
            self.interval_start, self.interval_examples = time.perf_counter(), 0

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """``scalars`` (named as they are shown: ``train/loss``, ``val/R@1``) at ``step``, to every tracker."""
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def validation(self, step: int, metrics: Mapping[str, float]) -> None:
        """An evaluation's metrics, as ``val/<metric>``."""
        self.log({f"val/{name}": value for name, value in metrics.items()}, step)

    def close(self, status: str = tracking.FINISHED) -> None:
        """End the bar and every tracker; ``status``: how the run ended (``tracking.FAILED`` when it raised)."""
        if self.progress is not None:
            self.progress.close()
        trackers, self.trackers, self.writer = self.trackers, [], None  # closed once, even if called again
        tracking.finish_all(trackers, status)
