"""The demo's ablations (``interbert demo --ablations``): pretraining variants, several seeds each, in one table.

A variant is a label and dotted overrides of the demo's settings (``configs/demo/ablations.yaml``). Each
(variant, seed) run leaves ``result.json`` in its folder with the settings it ran (``config``); a later
call whose resolved settings are the same reuses it, so an interrupted ablation resumes and new variants
join an old table. Runs recorded before the demo had configs (a ``plan`` instead) are run again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from interbert.errors import UsageError
from interbert.recipes.demo_settings import DemoSettings, config_file, load_demo, same_config
from interbert.recipes.demo_stages import machine, run_variant
from interbert.utils import typed_config
from interbert.utils.config_files import read_config
from interbert.train.curves import moving_mean, read_history, valued_steps, write_loss_comparison
from interbert.utils.files import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

FINAL_STEPS = 100  # the window of the end-of-pretraining loss means and of the "ITM learned" step

METRICS = (("IR R@1", "finetuned", "R@1"), ("IR R@5", "finetuned", "R@5"), ("IR R@10", "finetuned", "R@10"),
           ("zero-shot R@1", "zero_shot", "R@1"), ("zero-shot R@5", "zero_shot", "R@5"))


@dataclass
class Ablation:
    label: str  # the table's row
    overrides: list[str]  # dotted key=value changes of the demo's settings


@dataclass
class AblationTable:
    base: list[str]  # overrides every variant starts from
    seeds: list[int]
    default: list[str]  # what --ablations runs without --ablation-variants
    variants: dict[str, Ablation]

    def __post_init__(self) -> None:
        unknown = [name for name in self.default if name not in self.variants]
        if unknown:
            raise ValueError(f"default names variants that are not listed: {unknown}")


def load_ablations() -> AblationTable:
    """``configs/demo/ablations.yaml``, typed."""
    path, raw = read_config(config_file("ablations"))
    return typed_config.from_dict(AblationTable, raw, source=str(path))


def check_variants(table: AblationTable, variants: Sequence[str]) -> Sequence[str]:
    """``variants`` if the table lists each; else a UsageError naming those it does not."""
    unknown = [v for v in variants if v not in table.variants]
    if unknown:
        raise UsageError(f"unknown ablation(s) {unknown}; choose from {list(table.variants)}")
    return variants


def variant_settings(table: AblationTable, overrides: Sequence[str], variant: str, seed: int) -> DemoSettings:
    """The demo's settings (with the main run's ``overrides``) changed as ``variant`` says, at ``seed``."""
    return load_demo([*overrides, *table.base, *table.variants[variant].overrides, f"seed={seed}"])


def variant_runs(out: Path, table: AblationTable, overrides: Sequence[str], variant: str, seeds: Sequence[int],
                 manifest: dict, data_dir: Path) -> list[dict]:
    """One variant's runs, a seed each: a finished one (``result.json`` with the same settings) is reused."""
    runs = []
    for seed in seeds:
        demo = variant_settings(table, overrides, variant, seed)
        folder = out / f"{variant}_seed{seed}"
        record = folder / "result.json"
        recorded = json.loads(record.read_text()) if record.exists() else {}
        if same_config(recorded.get("config"), demo):
            logger.info("ablation %s, seed %d: reusing %s", variant, seed, record)
            runs.append(recorded)
            continue
        if "plan" in recorded:
            logger.info("ablation %s, seed %d: %s was recorded before the demo had configs: running it again",
                        variant, seed, record)
        logger.info("ablation %s, seed %d", variant, seed)
        result = {"config": demo.to_dict(), **run_variant(folder, demo, manifest, data_dir)}
        atomic_write_json(record, json.loads(json.dumps(result, default=float)))
        runs.append(result)
    return runs


def seed_statistics(runs: Sequence[dict]) -> dict[str, dict]:
    """Each metric's mean, std and values over the seeds' runs."""
    metrics = {}
    for key, side, name in METRICS:
        values = [r[side]["image_retrieval"][name] for r in runs]
        metrics[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    return metrics


def run_ablations(out: Path, overrides: Sequence[str], manifest: dict, data_dir: Path,
                  variants: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> dict:
    """Pretraining variants (masking, negatives, ...), each over ``seeds`` (the table's by default): mean +- std
    of the retrieval recalls, written to ``out/ablations.{md,json}`` and a loss plot. ``overrides``: the main
    run's (``--quick``, ``--lang`` ...), under every variant's own."""
    table = load_ablations()
    variants, seeds = check_variants(table, variants or table.default), seeds or table.seeds
    rows, curves, extra, folders, minutes = {}, {}, {}, {}, 0.0
    for variant in variants:
        label = table.variants[variant].label
        runs = variant_runs(out, table, overrides, variant, seeds, manifest, data_dir)
        minutes += sum(r.get("seconds", 0.0) for r in runs) / 60
        rows[label] = seed_statistics(runs)
        folders[label] = [out / f"{variant}_seed{seed}" for seed in seeds]
        curves[label] = final_pretraining_losses(folders[label])
        extra[label] = {"itm_below_step": [itm_learning_step(f) for f in folders[label]],
                        "pretrain_minutes": [r["pretrain_seconds"] / 60 for r in runs if "pretrain_seconds" in r],
                        "pretrain_steps": runs[0]["config"]["pretrain"]["train"]["max_steps"]}
    main = load_demo(overrides)
    atomic_write_json(out / "ablations.json", {label: {**rows[label], "final_pretraining_losses": curves[label],
                                                       **extra[label]} for label in rows})
    atomic_write_text(out / "ablations.md", "\n".join(ablations_markdown(rows, curves, extra, seeds, main, minutes)))
    write_loss_plot(folders, out / "ablations_losses.png")
    return rows


def ablations_markdown(rows: dict, curves: dict, extra: dict, seeds: Sequence[int], main: DemoSettings,
                       minutes: float) -> list[str]:
    """The ablation table (mean +- std per metric, when ITM leaves chance, the pretraining cost) and the end
    of pretraining's losses."""
    columns = list(next(iter(rows.values())))
    table = [f"# Ablations (built-in benchmark, {len(seeds)} seeds, mean +- std)", "",
             "| pretraining | " + " | ".join(columns) + f" | ITM < {ITM_LEARNED} at step | pretrain steps | pretrain min |",
             "|---|" + "---|" * (len(columns) + 3)]
    for label, metrics in rows.items():
        cells = [f"{m['mean']:.1f} +- {m['std']:.1f}" for m in metrics.values()]
        e = extra[label]
        cells += [_learning_cell(e["itm_below_step"]), str(e["pretrain_steps"]),
                  f"{np.mean(e['pretrain_minutes']):.1f}" if e["pretrain_minutes"] else "-"]
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    table += ["", f"Seeds {list(seeds)}; each run pretrains {main.pretrain.train.max_steps} steps (unless the row says) "
              f"and fine-tunes {main.finetune.train.max_steps} steps as in the main table; {minutes:.1f} min of runs in all. "
              f"Machine: {machine()['cpu']}, torch threads {torch.get_num_threads()}. "
              f"'ITM < {ITM_LEARNED} at step': the first step whose {FINAL_STEPS}-step mean ITM loss is below "
              f"{ITM_LEARNED}, mean over the seeds that get there (how many in brackets); '-': none does.", ""]
    names = sorted({name for losses in curves.values() for name in losses})
    if names:
        table += [f"Pretraining losses at the end (mean of the last {FINAL_STEPS} steps, averaged over seeds; "
                  "ITM at chance is 0.693):", "",
                  "| pretraining | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        table += [f"| {label} | " + " | ".join(f"{losses[n]:.3f}" if n in losses else "" for n in names) + " |"
                  for label, losses in curves.items()]
        table += ["", "Losses over pretraining (100-step moving mean, averaged over seeds): ![ITM and ITC losses]"
                  "(ablations_losses.png)", ""]
    return table


ITM_LEARNED = 0.6  # the ITM loss (chance 0.693) below which the matching head has clearly left chance


def first_step_below(values: Sequence[float | None], threshold: float, window: int = FINAL_STEPS) -> int | None:
    """The first pretraining step (1-based) at which the mean of the last ``window`` values is below
    ``threshold``; None when it never is (steps without a value are skipped: the window then spans more steps)."""
    steps, series = valued_steps(values)
    if len(series) < window:
        return None
    means = moving_mean(series, window)  # means[i]: values i .. i+window-1
    below = np.flatnonzero(means < threshold)
    return int(steps[below[0] + window - 1]) if len(below) else None


def itm_learning_step(folder: Path) -> int | None:
    history_file = folder / "pretrain" / "loss_history.json"
    if not history_file.exists():
        return None
    return first_step_below(json.loads(history_file.read_text()).get("itm_loss", []), ITM_LEARNED)


def _learning_cell(steps: Sequence[int | None]) -> str:
    reached = [s for s in steps if s is not None]
    return f"{np.mean(reached):.0f} ({len(reached)}/{len(steps)})" if reached else "-"


def write_loss_plot(folders: dict[str, Sequence[Path]], path: Path, names: Sequence[str] = ("itm_loss", "itc_loss")) -> None:
    """One panel per loss: each row's pretraining curve (``FINAL_STEPS``-step moving mean), averaged over its
    runs, with chance and ``ITM_LEARNED`` marked on the ITM panel (the library's comparison plot)."""
    runs = {label: [read_history(f / "pretrain") for f in runs if (f / "pretrain" / "loss_history.json").exists()]
            for label, runs in folders.items()}
    write_loss_comparison(path, runs, names, window=FINAL_STEPS, xlabel="pretraining step",
                          reference_lines={"itm_loss": [(0.693, ":"), (ITM_LEARNED, "--")]})


def final_pretraining_losses(folders: Sequence[Path]) -> dict[str, float]:
    """Each loss of the runs' pretraining (``pretrain/loss_history.json``) over its last steps, averaged
    over the runs that have one."""
    per_run = []
    for folder in folders:
        history_file = folder / "pretrain" / "loss_history.json"
        if history_file.exists():
            history = json.loads(history_file.read_text())
            per_run.append({name: float(np.mean([v for v in values if v is not None][-FINAL_STEPS:]))
                            for name, values in history.items() if name.endswith("_loss") and any(v is not None for v in values)})
    names = {name for run in per_run for name in run}
    return {name: float(np.mean([run[name] for run in per_run if name in run])) for name in sorted(names)}

