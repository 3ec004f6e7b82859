"""Training curves as PNG: every run's ``curves.png`` (its losses and validation metrics against the update),
and the comparison of several runs' losses that the demo draws for its ablations.

Both read what ``loss_history.json`` holds: one value per update for each series (None at updates that did
not compute it, e.g. ITM at the masked updates of ``task_sampling=alternate``) and the evaluations as
``{"step": s, metric: value, ...}``. Figures are drawn on matplotlib's ``Figure`` directly (the Agg
renderer, no pyplot): no display is needed, no global backend is switched, and nothing is left open.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from interbert.train.checkpoint import HISTORY_NAME
from interbert.utils.files import atomic_write

logger = logging.getLogger(__name__)

CURVES_NAME = "curves.png"
COLUMNS = 3  # panels per row of curves.png
MAX_POINTS_UNSMOOTHED = 50  # beyond this many values, a panel adds a moving mean over ~1/25 of them

History = Mapping[str, Sequence[float | None]]


def valued_steps(values: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, series)``: the 1-based updates that have a value and those values."""
    steps = np.asarray([i + 1 for i, v in enumerate(values) if v is not None], dtype=int)
    return steps, np.asarray([v for v in values if v is not None], dtype=float)


def moving_mean(series: np.ndarray, window: int) -> np.ndarray:
    """The mean of each ``window`` consecutive values (``len(series) - window + 1`` of them)."""
    return np.convolve(series, np.ones(window) / window, mode="valid")


def read_history(folder: str | Path) -> dict:
    """A run folder's ``loss_history.json``: its series and, under ``"eval"``, its evaluations."""
    return json.loads((Path(folder) / HISTORY_NAME).read_text())


def _figure(rows: int, columns: int, width: float, height: float):
    from matplotlib.figure import Figure  # imported on first use: a run that never draws does not pay for it

    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False).ravel()


def _save(figure, path: str | Path) -> None:
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


def panel_names(history: History, eval_history: Sequence[Mapping[str, float]]) -> tuple[list[str], list[str]]:
    """The training losses with a value (``loss`` first) and the validation metrics (in the order the
    evaluations gave them) that curves.png draws."""
    losses = [name for name in history if (name == "loss" or name.endswith("_loss"))
              and any(v is not None for v in history[name])]
    losses.sort(key=lambda name: (name != "loss", name))
    metrics = list(dict.fromkeys(name for entry in eval_history for name in entry if name != "step"))
    return losses, metrics


def _validation_points(eval_history: Sequence[Mapping[str, float]], name: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[name]) for entry in eval_history if name in entry and math.isfinite(entry[name])]
    return [s for s, _ in points], [v for _, v in points]


def _draw_training(ax, values: Sequence[float | None]) -> None:
    steps, series = valued_steps(values)
    window = max(1, len(series) // 25)
    smoothed = len(series) > MAX_POINTS_UNSMOOTHED
    ax.plot(steps, series, color="tab:blue", lw=0.8, alpha=0.35 if smoothed else 1.0, label="training")
    if smoothed:
        ax.plot(steps[window - 1:], moving_mean(series, window), color="tab:blue", lw=1.5,
                label=f"training, mean of {window}")


def write_run_curves(path: str | Path, history: History, eval_history: Sequence[Mapping[str, float]]) -> Path:
    """One run's ``curves.png``: a panel per training loss (with its validation value where an evaluation
    reports a metric of the same name, as pretraining's held-out losses do) and a panel per other validation
    metric, against the update. Written atomically, so a viewer never sees half a file."""
    losses, metrics = panel_names(history, eval_history)
    names = losses + [name for name in metrics if name not in losses]
    columns = max(1, min(COLUMNS, len(names)))
    figure, axes = _figure(max(1, math.ceil(len(names) / columns)), columns, 4.2, 3.0)
    for ax, name in zip(axes, names):
        if name in losses:
            _draw_training(ax, history[name])
        steps, values = _validation_points(eval_history, name)
        if steps:
            ax.plot(steps, values, "o-", color="tab:orange", ms=3, lw=1, label="validation")
        ax.set_title(name if name in losses else f"{name} (validation)", fontsize=10)
        ax.set_xlabel("update")
        if name in losses and steps:
            ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if not names:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no update yet", ha="center", va="center", transform=axes[0].transAxes)
    _save(figure, path)
    return Path(path)


def write_curves_after_failure(path: Path, history: History, eval_history: Sequence[Mapping[str, float]]) -> None:
    """:func:`write_run_curves` for a run that raised: a failure to draw is logged, never raised over the
    run's own error (nor is anything drawn before the run folder exists)."""
    if not path.parent.is_dir():
        return
    try:
        write_run_curves(path, history, eval_history)
    except Exception as error:
        logger.warning("could not draw %s: %s", path, error)


def write_loss_comparison(path: str | Path, runs: Mapping[str, Sequence[History]], names: Sequence[str], *,
                          window: int, reference_lines: Mapping[str, Sequence[tuple[float, str]]] | None = None,
                          xlabel: str = "update") -> Path:
    """One panel per loss in ``names``, one curve per label of ``runs``: the ``window``-update moving mean of
    the loss, averaged over that label's runs (histories; runs shorter than ``window`` are left out, and the
    mean is taken over the updates all remaining runs have). ``reference_lines``: per loss, ``(value,
    linestyle)`` grey horizontal lines (e.g. chance level). Twenty labels get distinct colours (tab20, solid,
    then dashed)."""
    from matplotlib import colormaps

    figure, axes = _figure(1, len(names), 6.0, 4.5)
    colors = colormaps["tab20"].colors
    for row, (label, histories) in enumerate(runs.items()):
        for ax, name in zip(axes, names):
            valued = [valued_steps(history.get(name, [])) for history in histories]
            valued = [(steps, series) for steps, series in valued if len(series) >= window]
            if not valued:
                continue
            length = min(len(series) for _, series in valued)
            mean = np.mean([moving_mean(series[:length], window) for _, series in valued], 0)
            ax.plot(valued[0][0][window - 1:length], mean, label=label,  # at the update of each window's last value
                    color=colors[(2 * row) % 20 + (row // 10) % 2], ls=("-", "--")[(row // 10) % 2])
    for ax, name in zip(axes, names):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} ({window}-step mean, over runs)")
        for value, style in (reference_lines or {}).get(name, ()):
            ax.axhline(value, color="grey", lw=0.8, ls=style)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    _save(figure, path)
    return Path(path)
