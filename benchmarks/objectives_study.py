"""Issue 28: when do InterBERT's two ideas pay? Group vs plain masking (RQ1) and TF-IDF vs random negatives (RQ2)
across the built-in benchmark's knobs and data sizes.

The study is data (`objectives_study.yaml` beside this script): series of knob settings x pretraining variants x
seeds. Each run is the demo's (`interbert.recipes.demo_stages.run_variant`: pretraining, retrieval fine-tuning,
full-protocol evaluation of the fine-tuned model and of the pretrained one zero-shot) on the benchmark `data synth`
generates for its setting (once per setting, shared by its runs), plus the mechanism measurements on the pretrained
model (`interbert evaluate mechanisms`: MRM with group vs plain masking, ITM on twin vs random pairs).

A finished run leaves `result.json` in its folder under `--runs` and is reused wherever a later call plans a run
with the same resolved settings (and benchmark seed), as the demo's ablations do: the study extends run by run,
resumes after a kill, and a run two series share runs once. The tables (`results/objectives_study.md`, between its
markers; `results/objectives_study.json`; a plot per knob) are written from whatever has finished: mean +- std per
row, a paired t-test over the seeds two rows share, rows short of seeds marked.

    python benchmarks/objectives_study.py --dry-run                          # every run, cached or to do, and the estimate
    python benchmarks/objectives_study.py --series default --threads 1       # reproduces results/ablations.md's rows
    python benchmarks/objectives_study.py --jobs 6 --threads 2 --device cuda # all of it on a GPU box
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STUDY = Path(__file__).resolve().with_suffix(".yaml")
logger = logging.getLogger("objectives_study")


# ---- the study's schema (objectives_study.yaml) --------------------------------------------------------
@dataclass
class Variant:
    label: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Setting:
    value: Any = None  # the knob's value (none: the series has no knob)
    overrides: list[str] = field(default_factory=list)  # what the value needs besides (e.g. a larger padding)
    label: str | None = None  # the tables' name of the setting (default: the value's)


@dataclass
class Series:
    variants: list[str]
    settings: list[Setting]
    about: str = ""
    knob: str | None = None  # a dotted key of the demo's settings
    steps_per_image: float | None = None  # pretraining steps = this x data.pretrain_images (the knob)

    def __post_init__(self) -> None:
        if not self.settings:
            raise ValueError("settings must list at least one setting ({} for the defaults)")
        if self.steps_per_image is not None and self.knob != "data.pretrain_images":
            raise ValueError("steps_per_image needs knob: data.pretrain_images (the steps follow the images)")


@dataclass
class Estimate:
    pretrain_step: float
    finetune_step: float
    evaluation: float
    mechanisms: float
    synth_image: float


@dataclass
class Study:
    seeds: list[int]
    variants: dict[str, Variant]
    effects: dict[str, list[str]]
    series: dict[str, Series]
    estimate: Estimate
    base: list[str] = field(default_factory=list)
    data_seed: int = 0
    mechanism_train_images: int = 200

    def __post_init__(self) -> None:
        for name, series in self.series.items():
            unknown = [v for v in series.variants if v not in self.variants]
            if unknown:
                raise ValueError(f"series {name} names variants that are not listed: {unknown}")
        for name, arms in self.effects.items():
            if len(arms) != 2 or any(a not in self.variants for a in arms):
                raise ValueError(f"effects: {name!r} must be [arm, reference], two listed variants, not {arms}")


def load_study(path: Path) -> Study:
    from interbert.utils import typed_config
    from interbert.utils.config_files import read_config

    path, raw = read_config(path)
    return typed_config.from_dict(Study, raw, source=str(path))


def check_series(study: Study, names: Sequence[str] | None) -> list[str]:
    """``names`` (all the study's series when None) if the study lists each; else one UsageError naming them."""
    from interbert.errors import UsageError

    unknown = [n for n in names or () if n not in study.series]
    if unknown:
        raise UsageError(f"unknown series {unknown}; the study lists {list(study.series)}")
    return list(names or study.series)


# ---- the plan: every run, with its resolved settings -------------------------------------------------
def value_label(value: Any) -> str:
    """A knob value as the tables show it: [3, 4] -> 3-4, [1, 1] -> 1; no value: the defaults."""
    if isinstance(value, list):
        return str(value[0]) if len(set(value)) == 1 else "-".join(map(str, value))
    return "defaults" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def setting_overrides(series: Series, setting: Setting) -> list[str]:
    """The dotted overrides a setting stands for: its knob value, its own, and the steps of its budget."""
    out = [f"{series.knob}={json.dumps(setting.value)}"] if series.knob and setting.value is not None else []
    out += setting.overrides
    if series.steps_per_image is not None:
        out.append(f"pretrain.train.max_steps={max(1, round(series.steps_per_image * setting.value))}")
    return out


@dataclass(frozen=True)
class Run:
    series: str
    setting: str  # value_label of the knob's value
    variant: str
    seed: int
    settings: Any  # DemoSettings
    key: str  # the resolved settings and the benchmark's seed, canonical JSON: what identifies a finished run

    @property
    def folder_name(self) -> str:
        return f"{self.variant}_seed{self.seed}_{digest(self.key)}"

    def data_arguments(self, data_seed: int) -> dict:
        from interbert.recipes.demo_settings import generate_arguments

        return generate_arguments(dataclasses.replace(self.settings, seed=data_seed))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_key(config: dict, data_seed: int) -> str:
    return json.dumps({"config": config, "data_seed": data_seed}, sort_keys=True, default=str)


def plan_runs(study: Study, series_names: Sequence[str], overrides: Sequence[str] = ()) -> list[Run]:
    """Every (series, setting, variant, seed) of ``series_names``, its settings resolved as the demo resolves
    them; a bad key or knob value is one UsageError naming the series and the setting."""
    from interbert.recipes.demo_settings import load_demo
    from interbert.utils.config_files import ConfigError

    try:  # the overrides every run shares, alone first: an error in them is theirs, not a series'
        load_demo([*overrides, *study.base])
    except ConfigError as error:
        raise ConfigError(f"the overrides of every run (the command line's, the study's base): {error}") from None
    runs = []
    for name in series_names:
        series = study.series[name]
        for setting in series.settings:
            label = setting.label or value_label(setting.value)
            for variant in series.variants:
                for seed in study.seeds:
                    given = [*overrides, *study.base, *setting_overrides(series, setting),
                             *study.variants[variant].overrides, f"seed={seed}"]
                    try:
                        settings = load_demo(given)
                    except ConfigError as error:
                        raise ConfigError(f"series {name}, setting {label}, variant {variant}: {error}") from None
                    runs.append(Run(name, label, variant, seed, settings, run_key(settings.to_dict(), study.data_seed)))
    return runs


def finished_runs(runs_dir: Path) -> dict[str, dict]:
    """Every finished run under ``runs_dir`` by its key: the recorded settings read through today's schema
    (a setting added since counts as its default, as ``same_config`` reads them); a record today's schema
    refuses is left out, so its run is planned again."""
    from interbert.recipes.demo_settings import DemoSettings
    from interbert.utils import typed_config
    from interbert.utils.config_files import ConfigError

    from interbert.errors import DataError

    found = {}
    for record in sorted(runs_dir.glob("*/result.json")):
        try:
            result = json.loads(record.read_text())
        except json.JSONDecodeError as error:  # written atomically by run_one: this one was not
            raise DataError(f"{record}: not a run record ({error}); move it away to run that run again") from None
        try:
            config = typed_config.from_dict(DemoSettings, result["config"], source=str(record)).to_dict()
        except (ConfigError, KeyError):
            logger.warning("%s: recorded under settings this code does not know; its run is planned again", record)
            continue
        found[run_key(config, result.get("data_seed", 0))] = {**result, "folder": str(record.parent)}
    return found


# ---- running ------------------------------------------------------------------------------------------
def data_folder(runs_dir: Path, arguments: dict) -> Path:
    return runs_dir / "data" / digest(json.dumps(arguments, sort_keys=True))


def prepare_data(run: Run, runs_dir: Path, data_seed: int) -> Path:
    """The run's benchmark, generated once per setting (reused when its manifest says the same settings);
    the seconds it took are kept beside it for the compute total."""
    from interbert.recipes.demo_stages import generate_data
    from interbert.utils.files import atomic_write_json

    folder = data_folder(runs_dir, run.data_arguments(data_seed))
    timing = folder / "generation.json"
    started = time.perf_counter()
    generate_data(dataclasses.replace(run.settings, seed=data_seed), folder)
    if not timing.exists():
        atomic_write_json(timing, {"seconds": time.perf_counter() - started, "device": "cpu"})
    return folder


def device_name(device: str | None) -> str:
    """The device a run trained on, as its record says it (training's default is auto)."""
    import torch

    from interbert.utils.device import resolve_device

    target = resolve_device(device or "auto")
    return f"cuda ({torch.cuda.get_device_name(target)})" if target.type == "cuda" else "cpu"


def measure_mechanisms(model: str, settings, manifest: dict, data_dir: Path, device: str | None,
                       train_images: int) -> dict:
    """``evaluate mechanisms`` on the pretrained model: the test split (every image has a twin), and the
    first ``train_images`` pretraining images when some of them have twins (``--twin-share``)."""
    from interbert.recipes.demo_settings import benchmark_files
    from interbert.recipes.mechanisms import evaluate_mechanisms

    files = benchmark_files(manifest, data_dir)
    kw = {"max_tokens": settings.data.max_tokens, "max_regions": settings.data.max_regions, "seed": settings.seed,
          "device": device or "cpu"}
    out = {"test": evaluate_mechanisms(model, files["captions"], files["features"], split="test", **kw)}
    if manifest["splits"].get("train_twin_pairs"):
        out["train"] = evaluate_mechanisms(model, files["captions"], files["features"], split="train",
                                           max_images=train_images, **kw)
    return out


def run_one(run_dir: Path, settings_dict: dict, data_dir: Path, data_seed: int, device: str | None,
            threads: int | None, train_images: int) -> dict:
    """One run, end to end, in this process (or a worker of ``--jobs``): its ``result.json``. A run another
    study process (another series sharing it, a second call beside this one) finished since this one was
    planned is read, not trained again; two processes that start the same run at once both train it."""
    finished = run_dir / "result.json"
    if finished.is_file():
        logger.info("%s: finished meanwhile by another study process; reused", run_dir)
        return json.loads(finished.read_text())
    import torch

    from interbert.recipes.demo_settings import DemoSettings
    from interbert.recipes.demo_stages import machine, run_variant
    from interbert.utils import typed_config
    from interbert.utils.files import atomic_write_json

    if threads:
        torch.set_num_threads(threads)
    settings = typed_config.from_dict(DemoSettings, settings_dict, source="planned run")
    manifest = json.loads((data_dir / "synth.json").read_text())
    started = time.perf_counter()
    scores = run_variant(run_dir, settings, manifest, data_dir, device)
    mechanisms = measure_mechanisms(scores["pretrained"], settings, manifest, data_dir, device, train_images)
    result = {"config": settings.to_dict(), "data_seed": data_seed, "data": str(data_dir), **scores,
              "mechanisms": mechanisms, "seconds": time.perf_counter() - started, "device": device_name(device),
              "machine": machine(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result = json.loads(json.dumps(result, default=lambda v: str(v) if isinstance(v, Path) else float(v)))
    atomic_write_json(run_dir / "result.json", result)
    return result


def execute(todo: Sequence[Run], study: Study, runs_dir: Path, jobs: int, device: str | None,
            threads: int | None) -> None:
    """Every run of ``todo`` (each once), a setting's benchmark generated before its runs start; with ``jobs``
    > 1 in worker processes, which train one setting's runs while the next setting's benchmark is generated."""
    by_data: dict[str, list[Run]] = {}
    for run in todo:
        by_data.setdefault(json.dumps(run.data_arguments(study.data_seed), sort_keys=True), []).append(run)

    def arguments(run: Run, data_dir: Path) -> tuple:
        return (runs_dir / run.folder_name, run.settings.to_dict(), data_dir, study.data_seed, device, threads,
                study.mechanism_train_images)

    if jobs <= 1:
        for runs in by_data.values():
            data_dir = prepare_data(runs[0], runs_dir, study.data_seed)
            for run in runs:
                logger.info("%s %s: %s, seed %d", run.series, run.setting, run.variant, run.seed)
                run_one(*arguments(run, data_dir))
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = []
        for runs in by_data.values():
            data_dir = prepare_data(runs[0], runs_dir, study.data_seed)
            futures += [pool.submit(run_one, *arguments(run, data_dir)) for run in runs]
        for future in futures:
            future.result()


# ---- the estimate (--dry-run) ----------------------------------------------------------------------------
def estimated_seconds(settings, estimate: Estimate) -> float:
    """A run's compute from the study's per-step figures, its steps scaled by its padded length."""
    length = (settings.data.max_tokens + settings.data.max_regions) / 56
    steps = (settings.pretrain.train.max_steps * estimate.pretrain_step
             + settings.finetune.train.max_steps * estimate.finetune_step)
    return steps * length + estimate.evaluation + estimate.mechanisms


def dry_run_lines(plan: Sequence[Run], done: dict[str, dict], study: Study, runs_dir: Path) -> list[str]:
    """Every planned run (cached or to do, a run two series share listed under both, counted once) and the
    compute the ones to do should take."""
    lines, counted, todo_seconds, data_seconds, generated = [], set(), 0.0, 0.0, set()
    for run in plan:
        cached = done.get(run.key)
        status = f"cached  {cached['folder']}" if cached else "shared  (listed above)" if run.key in counted else "to do"
        if not cached and run.key not in counted:
            seconds = estimated_seconds(run.settings, study.estimate)
            todo_seconds += seconds
            status += f"   ~{seconds / 60:.0f} min"
            arguments = run.data_arguments(study.data_seed)
            folder = data_folder(runs_dir, arguments)
            if folder.name not in generated and not (folder / "synth.json").exists():
                data_seconds += arguments["images"] * study.estimate.synth_image
            generated.add(folder.name)
        counted.add(run.key)
        lines.append(f"{run.series:<10} {run.setting:<9} {run.variant:<17} seed {run.seed}  {status}")
    unique = len(counted)
    cached = sum(1 for key in counted if key in done)
    lines += ["", f"{len(plan)} planned runs, {unique} distinct: {cached} cached, {unique - cached} to do.",
              f"Estimated compute of those to do: {todo_seconds / 3600:.1f} h of runs + {data_seconds / 60:.0f} min of "
              f"data synth (one torch thread per run on the machine the study's estimate figures come from; "
              f"--jobs N divides the wall time where there are cores for it, a GPU shortens the training)."]
    return lines


# ---- the tables: mean +- std per row, paired effects over seeds ---------------------------------------------
# (name, where in result.json, scale): retrieval recalls in %, the mechanism measurements' shares in % too
METRICS = (("IR R@1", ("finetuned", "image_retrieval", "R@1"), 1), ("IR R@5", ("finetuned", "image_retrieval", "R@5"), 1),
           ("IR R@10", ("finetuned", "image_retrieval", "R@10"), 1),
           ("zero-shot R@1", ("zero_shot", "image_retrieval", "R@1"), 1),
           ("zero-shot R@5", ("zero_shot", "image_retrieval", "R@5"), 1))
MECHANISMS = (("MRM acc group", ("mechanisms", "test", "mrm_leakage", "group", "accuracy"), 100),
              ("MRM acc plain", ("mechanisms", "test", "mrm_leakage", "plain", "accuracy"), 100),
              ("MRM leak", ("mechanisms", "test", "mrm_leakage", "leak", "accuracy"), 100),
              ("ITM twin choice", ("mechanisms", "test", "itm_twins", "twin", "choice"), 100),
              ("ITM random choice", ("mechanisms", "test", "itm_twins", "random", "choice"), 100),
              ("ITM twin choice, train", ("mechanisms", "train", "itm_twins", "twin", "choice"), 100))
EFFECT_METRICS = ("IR R@1", "zero-shot R@1", "MRM leak", "ITM twin choice")


def metric_value(record: dict, path: Sequence[str], scale: float) -> float | None:
    """A number of a run's record, or None where the record has none (a measurement skipped, a feature target)."""
    node: Any = record
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if node is None else float(node) * scale


def seed_summary(values: dict[int, float]) -> dict:
    """Mean and sample standard deviation (ddof 1; none below 2 seeds) of one row's values by seed."""
    numbers = list(values.values())
    return {"n": len(numbers), "mean": float(np.mean(numbers)) if numbers else None,
            "std": float(np.std(numbers, ddof=1)) if len(numbers) > 1 else None, "values": values}


def paired_effect(arm: dict[int, float], reference: dict[int, float]) -> dict:
    """``arm`` - ``reference`` over the seeds both have: mean and std of the differences, and the paired
    t-test's two-sided p (none below 2 pairs, or when every difference is the same: no spread to test)."""
    from scipy import stats

    seeds = sorted(set(arm) & set(reference))
    differences = [arm[s] - reference[s] for s in seeds]
    out = {"seeds": seeds, "n": len(seeds), "mean": float(np.mean(differences)) if seeds else None,
           "std": float(np.std(differences, ddof=1)) if len(seeds) > 1 else None, "p": None}
    if len(seeds) > 1 and np.ptp(differences) > 0:
        out["p"] = float(stats.ttest_rel([arm[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
    return out


def run_values(records: Sequence[tuple[int, dict]]) -> dict[str, dict[int, float]]:
    """Each metric's value by seed over a row's finished runs (``(seed, record)`` pairs)."""
    values: dict[str, dict[int, float]] = {}
    for name, path, scale in (*METRICS, *MECHANISMS):
        found = {seed: metric_value(record, path, scale) for seed, record in records}
        values[name] = {seed: v for seed, v in found.items() if v is not None}
    return values


def series_report(study: Study, name: str, plan: Sequence[Run], done: dict[str, dict]) -> dict:
    """One series' rows (setting x variant, every metric over the finished seeds) and effects (each of the
    study's effects whose two arms the series runs, per setting, paired over seeds)."""
    series = study.series[name]
    rows, effects = [], []
    for setting in dict.fromkeys(run.setting for run in plan if run.series == name):
        values = {}
        for variant in series.variants:
            cell = [(r.seed, done[r.key]) for r in plan if r.series == name and r.setting == setting
                    and r.variant == variant and r.key in done]
            values[variant] = run_values(cell)
            rows.append({"setting": setting, "variant": variant, "label": study.variants[variant].label,
                         "seeds": [seed for seed, _ in cell], "devices": sorted({rec.get("device", "?") for _, rec in cell}),
                         "metrics": {m: seed_summary(v) for m, v in values[variant].items()}})
        for effect, (arm, reference) in study.effects.items():
            if arm in series.variants and reference in series.variants:
                effects.append({"setting": setting, "effect": effect, "arm": arm, "reference": reference,
                                "metrics": {m: paired_effect(values[arm][m], values[reference][m]) for m in EFFECT_METRICS}})
    return {"about": series.about, "knob": series.knob, "variants": series.variants, "rows": rows, "effects": effects}


def compute_report(plan: Sequence[Run], done: dict[str, dict]) -> dict:
    """The finished runs (each once), their compute by device, and the benchmarks' generation."""
    runs, seen, data = [], set(), {}
    for run in plan:
        record = done.get(run.key)
        if record is None or run.key in seen:
            continue
        seen.add(run.key)
        runs.append({"series": run.series, "setting": run.setting, "variant": run.variant, "seed": run.seed,
                     "folder": record["folder"], "device": record.get("device", "?"), "seconds": record.get("seconds", 0.0)})
        timing = Path(record.get("data", "")) / "generation.json"
        if timing.is_file():
            data[str(timing.parent)] = json.loads(timing.read_text())["seconds"]
    by_device: dict[str, float] = {}
    for run in runs:
        by_device[run["device"]] = by_device.get(run["device"], 0.0) + run["seconds"] / 3600
    return {"runs": runs, "run_hours": sum(r["seconds"] for r in runs) / 3600, "data_hours": sum(data.values()) / 3600,
            "benchmarks": len(data), "hours_by_device": by_device}


# ---- writing: results/objectives_study.{json,md} and a plot per knob ------------------------------------------
BEGIN, END = "<!-- objectives_study.py: tables begin -->", "<!-- objectives_study.py: tables end -->"


def summary_cell(summary: dict) -> str:
    if not summary["n"]:
        return "-"
    return f"{summary['mean']:.1f}" if summary["std"] is None else f"{summary['mean']:.1f} +- {summary['std']:.1f}"


def effect_cell(effect: dict) -> str:
    if not effect["n"]:
        return "-"
    spread = "" if effect["std"] is None else f" +- {effect['std']:.1f}"
    test = "no test: 1 pair" if effect["n"] < 2 else "no spread" if effect["p"] is None else f"p {effect['p']:.3f}"
    return f"{effect['mean']:+.1f}{spread} ({test}, n {effect['n']})"


def seeds_cell(found: Sequence[int], wanted: int) -> str:
    return "not run" if not found else f"{len(found)}/{wanted}" + ("" if len(found) >= wanted else " **too few**")


def series_markdown(name: str, report: dict, wanted: int, plot: str | None) -> list[str]:
    knob = f" (knob `{report['knob']}`)" if report["knob"] else ""
    metrics, mechanisms = [m for m, _, _ in METRICS], [m for m, _, _ in MECHANISMS]
    lines = [f"### Series `{name}`{knob}", "", report["about"], "",
             "| setting | pretraining | seeds | " + " | ".join(metrics) + " | device |", "|---|" + "---|" * (len(metrics) + 3)]
    for row in report["rows"]:
        cells = [summary_cell(row["metrics"][m]) for m in metrics]
        lines.append(f"| {row['setting']} | {row['label']} | {seeds_cell(row['seeds'], wanted)} | " + " | ".join(cells)
                     + f" | {', '.join(row['devices']) or '-'} |")
    lines += ["", "Mechanisms (`evaluate mechanisms` on the pretrained model, %):", "",
              "| setting | pretraining | " + " | ".join(mechanisms) + " |", "|---|---|" + "---|" * len(mechanisms)]
    lines += [f"| {row['setting']} | {row['label']} | " + " | ".join(summary_cell(row["metrics"][m]) for m in mechanisms) + " |"
              for row in report["rows"]]
    if report["effects"]:
        lines += ["", "Effects (arm - reference per seed; mean +- std of the differences, paired t-test over the shared seeds):",
                  "", "| setting | effect | " + " | ".join(EFFECT_METRICS) + " |", "|---|---|" + "---|" * len(EFFECT_METRICS)]
        lines += [f"| {e['setting']} | {e['effect']} | " + " | ".join(effect_cell(e["metrics"][m]) for m in EFFECT_METRICS) + " |"
                  for e in report["effects"]]
    if plot:
        lines += ["", f"![effects against {report['knob']}]({plot})"]
    return [*lines, ""]


def report_markdown(report: dict) -> str:
    compute, seeds = report["compute"], report["seeds"]
    devices = ", ".join(f"{device} {hours:.1f} h" for device, hours in compute["hours_by_device"].items()) or "none"
    lines = [BEGIN, "## Results (written by `benchmarks/objectives_study.py` from the finished runs)", "",
             f"Seeds {seeds}. Image retrieval recalls in % on the test split, full protocol; mean +- std (sample std, "
             "ddof 1) over the finished seeds. A row short of seeds is marked in its `seeds` column, a row with none "
             "reads `not run`: nothing is left out. Every effect is arm - reference per seed, with the two-sided p of a "
             "paired t-test over the seeds both rows have (none below 2 pairs).", "",
             f"Compute: {len(compute['runs'])} runs finished, {compute['run_hours']:.1f} h of runs (by device: {devices}) "
             f"and {compute['data_hours']:.1f} h generating {compute['benchmarks']} benchmarks (CPU). Each run's device "
             "and time: `objectives_study.json` (`compute.runs`).", ""]
    for name, series in report["series"].items():
        lines += series_markdown(name, series, len(seeds), report["plots"].get(name))
    return "\n".join([*lines, END])


def fill_markdown(path: Path, section: str) -> None:
    """Put ``section`` between the file's markers (after the file's text when it has none), keeping the rest."""
    from interbert.utils.files import atomic_write_text

    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        text = head + section + rest.partition(END)[2]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + section + "\n"
    atomic_write_text(path, text)


def write_plot(name: str, report: dict, path: Path) -> bool:
    """Each effect's IR and zero-shot R@1 and the mechanisms against the series' knob; False when nothing finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(row["setting"] for row in report["rows"]))
    if not report["knob"] or not any(row["seeds"] for row in report["rows"]):
        return False
    x = np.arange(len(settings))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes[:2], ("IR R@1", "zero-shot R@1")):
        for effect in dict.fromkeys(e["effect"] for e in report["effects"]):
            points = [next(e for e in report["effects"] if e["effect"] == effect and e["setting"] == s)["metrics"][metric]
                      for s in settings]
            ax.errorbar(x, [p["mean"] if p["n"] else np.nan for p in points], [p["std"] or 0 for p in points],
                        marker="o", capsize=3, label=effect)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"{metric}: arm - reference (pp)", xticks=x, xticklabels=settings, xlabel=report["knob"])
    for variant in report["variants"]:
        for metric, style in (("MRM leak", "-"), ("ITM twin choice", "--")):
            points = [next(r for r in report["rows"] if r["variant"] == variant and r["setting"] == s)["metrics"][metric]
                      for s in settings]
            axes[2].errorbar(x, [p["mean"] if p["n"] else np.nan for p in points], [p["std"] or 0 for p in points],
                             ls=style, marker="o", capsize=3, label=f"{variant}: {metric}")
    axes[2].set(title="mechanisms (%)", xticks=x, xticklabels=settings, xlabel=report["knob"])
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:  # a series without an effect (one arm) leaves its panels empty
            ax.legend(fontsize=7)
    fig.suptitle(f"{name}: {report['about']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(study: Study, plan: Sequence[Run], done: dict[str, dict], output: Path) -> dict:
    """``objectives_study.json``, the tables in ``objectives_study.md`` and a plot per knob, from ``done``."""
    from interbert.utils.files import atomic_write_json

    output.mkdir(parents=True, exist_ok=True)
    report = {"seeds": study.seeds, "series": {name: series_report(study, name, plan, done) for name in study.series},
              "compute": compute_report(plan, done), "plots": {}}
    for name, series in report["series"].items():
        if write_plot(name, series, output / f"objectives_study_{name}.png"):
            report["plots"][name] = f"objectives_study_{name}.png"
    atomic_write_json(output / "objectives_study.json", json.loads(json.dumps(report, default=str)))
    fill_markdown(output / "objectives_study.md", report_markdown(report))
    return report


# ---- the command line ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="demo settings for every run, under the study's")
    parser.add_argument("--study", type=Path, default=STUDY, help="the study's definition (default: the YAML beside this script)")
    parser.add_argument("--series", nargs="+", help="run only these series (default: all); the tables show every series")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the study's")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "objectives_study", help="the runs' folders and benchmarks")
    parser.add_argument("--output", type=Path, default=REPO / "results", help="where objectives_study.{md,json} and the plots go")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (a GPU box, many cores)")
    parser.add_argument("--device", help="where to train and score: cpu, cuda, auto (default: train auto, score on cpu)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    parser.add_argument("--dry-run", action="store_true", help="list every run, cached or to do, with the compute estimate")
    parser.add_argument("--no-table", action="store_true", help="only run; a later call writes the tables")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick sizes under every run (a smoke test)")
    return parser.parse_intermixed_args(argv)  # key=value overrides before and after the options


def main(argv: Sequence[str] | None = None) -> int:
    from interbert.recipes.demo_settings import QUICK

    args = parse_args(argv)
    study = load_study(args.study)
    if args.seeds:
        study = dataclasses.replace(study, seeds=args.seeds)
    chosen = check_series(study, args.series)
    if args.device:
        from interbert.utils.device import checked_device

        checked_device(args.device, "--device")  # a device this machine lacks: refused before any run
    overrides = [*(QUICK if args.quick else ()), *args.overrides]
    plan = plan_runs(study, list(study.series), overrides)  # every series' settings checked before anything runs
    done = finished_runs(args.runs)
    if args.dry_run:
        print("\n".join(dry_run_lines([r for r in plan if r.series in chosen], done, study, args.runs)))
        return 0
    todo = list({r.key: r for r in plan if r.series in chosen and r.key not in done}.values())
    logger.info("%d runs to do, %d cached", len(todo), len({r.key for r in plan if r.series in chosen}) - len(todo))
    execute(todo, study, args.runs, args.jobs, args.device, args.threads)
    if not args.no_table:
        write_report(study, plan, finished_runs(args.runs), args.output)
        print(f"tables: {args.output / 'objectives_study.md'}, {args.output / 'objectives_study.json'}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` with the project's error lines: a bad setting, series or file is one ``error: ...`` line."""
    from interbert.cli import error_exit_code, error_message

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return main(argv)
    except Exception as error:  # noqa: BLE001 -- the user's errors as one line, bugs with their traceback
        code = error_exit_code(error)
        if code is None:
            raise
        print(f"error: {error_message(error)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(cli())
