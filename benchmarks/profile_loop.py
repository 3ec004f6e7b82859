"""Where a training step goes, before and after: `interbert pretrain` and `interbert finetune retrieval`
(the tiny configs as shipped) on generated data, each phase timed per step, a baseline revision and
this tree alternating in one run.

    python benchmarks/profile_loop.py                       # baseline: BASELINE below; data generated
    python benchmarks/profile_loop.py --before 650bf18 --data DIR --steps 40 --rounds 2 --threads 2

The baseline revision is checked out into a temporary git worktree (removed at the end). Each
(recipe, side) runs in its own process - the recipe's `run()` with the side's own config file and
sources first on sys.path - and the sides alternate (before, after, before, after, ...) so a busy
machine slows both alike. Set-up (imports, TF-IDF, feature checks, caches) is not timed: the first
`--warmup` steps are dropped and the next `--steps` measured.

Phases are inclusive wall times per step of the functions named in `PHASES` (where a revision lacks a
function its phase reads 0), e.g. `data: feature reads` inside `data: batch`; `backward` is
`Tensor.backward` (the ITC passes' backward included), `other` is the step's wall time minus batch,
forward+backward and optimizer update (logging, loss statistics, progress). The forward of a pretraining
step is also split per encoder pass (embeddings included): `forward: masked pass` (what MSM and MRM read),
`forward: clean pass` (ITM on the unmasked inputs, `itm_inputs: clean`) and `forward: ITC passes` (each
modality alone through the encoder, the contrastive loss included); older revisions' names for them are
listed too (a revision before 28 Nov has one pass, the encoder's forward outside the ITC passes; from 28 Nov
to issue 25 the masked pass includes the MSM and MRM heads).

aten ops: after a side's timed steps, `--profile-steps` more (3) run under torch.profiler (CPU activity) in
the same process, started and stopped at step ends so they are no part of the timing. The table gets
`aten ops per step` (every `aten::` event the profiler records in those steps, nested ones included, over
the steps; the median over runs) and the top 5 aten ops by self CPU time per step (profiler overhead
included). The counting (common.py's, as compiled_step.py's) runs in this parent on the child's plain
profiler table, so it works on any baseline revision. Writes benchmarks/results/profile_loop.{json,md}
(JSON: per recipe `aten_ops_per_step` and `top_aten_ops` per side, each run's `aten_ops_per_step`); refuses
to start above a 1-minute load average of 1.0 unless --force (results then marked loaded).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
BASELINE = "650bf18"  # main when issue 14's work began
RECIPES = {
    "pretrain": ("interbert.recipes.pretrain", "configs/pretrain_tiny.yaml"),
    "retrieval": ("interbert.recipes.finetune_retrieval", "configs/finetune_retrieval_tiny.yaml"),
}


class Phase(NamedTuple):
    """A function wrapped where callers look it up (``module``'s attribute ``path``), its calls timed as ``name``."""

    name: str
    module: str
    path: str
    recipe: str | None = None  # counted only in this recipe's runs (the function is another pass elsewhere)
    outside: str | None = None  # calls made while this phase runs are not counted (passes through the same function)


P = Phase
PHASES = [
    P("data: batch (all of it)", "interbert.train", "_SeededBatches.__getitem__"),
    P("data: feature reads", "interbert.data.features", "FeatureStore.__getitem__"),
    P("data: region preparation", "interbert.data.batches", "prepare_regions"),
    P("data: tokenize", "interbert.data.batches", "encode_caption"),
    P("data: MSM masking", "interbert.data.batches", "apply_token_masking"),
    P("data: MSM spans", "interbert.data.masking", "TEXT_MASKERS"),
    P("data: MRM IoU groups", "interbert.data.batches", "mask_region_groups"),
    P("data: MRM regions", "interbert.data.batches", "mask_regions_independently"),
    P("data: MRM zeroing", "interbert.data.batches", "apply_region_masking"),
    P("data: negatives", "interbert.data.batches", "sample_itm_caption"),
    P("data: negatives", "interbert.data.batches", "random_other_image_caption"),
    P("data: collate", "interbert.data.batches", "collate"),
    P("forward (all)", "interbert.modeling", "InterBertForPreTraining.forward"),
    P("forward (all)", "interbert.modeling", "InterBertForImageTextRetrieval.forward"),
    # The encoder passes of a pretraining step (embeddings included), under each revision's names:
    # the masked pass (what MSM and MRM read; the streams' last layers only where they read) ...
    P("forward: masked pass", "interbert.modeling", "PassPlan.run"),  # issue 25 on (the clean pass runs later, lazily)
    P("forward: masked pass", "interbert.modeling", "InterBertForPreTraining.masked_pass"),  # 28 Nov - issue 25 (+ heads)
    P("forward: masked pass", "interbert.modeling", "InterBertModel.forward", recipe="pretrain",
      outside="forward: ITC passes"),  # before 28 Nov: the step's one pass through the encoder's forward
    # ... the clean pass (ITM on the unmasked inputs, itm_inputs=clean; position 0 only) ...
    P("forward: clean pass", "interbert.modeling", "PassPlan._clean_pass"),
    P("forward: clean pass", "interbert.modeling", "InterBertForPreTraining.matching_pass"),  # 28 Nov - issue 25 (and
    # there also the one pass of a matching step, in itm/msm alternation only)
    # ... and ITC's single-modal passes (each modality alone through the encoder; the loss included).
    P("forward: ITC passes", "interbert.modeling", "InterBertModel.contrastive_loss"),
    P("forward: ITC passes", "interbert.modeling", "InterBertModel.embed_text"),  # in-batch negatives pair with them
    P("forward: ITC passes", "interbert.modeling", "InterBertModel.embed_images"),
    P("backward", "torch", "Tensor.backward"),
    P("update (all)", "interbert.train", "Trainer._optimizer_step"),
    P("update: clip grad norm", "torch.nn.utils", "clip_grad_norm_"),
    P("update: EMA", "interbert.train", "ExponentialMovingAverage.update"),
    P("logging: loss stats", "interbert.train", "Trainer._reduce_step_stats"),
    P("logging: tensorboard", "interbert.train", "Trainer._write_scalars"),  # before train/ became a package
    P("logging: tensorboard", "interbert.train.reporting", "write_scalars"),  # before train.report_to
    P("logging: tensorboard", "interbert.train.reporting", "Reporter.log"),  # report_to's trackers (TensorBoard by default)
]


# --------------------------------------------------------------------------------------------------
# Child: one recipe on one side, instrumented
# --------------------------------------------------------------------------------------------------
def _instrument(calls: dict[str, list[tuple[float, float]]], recipe: str) -> None:
    """Wrap every function of PHASES (those of ``recipe``) to record (end time, duration) of each call,
    outermost only."""
    import importlib

    depth: dict[str, int] = {}

    def wrap(phase: Phase, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if phase.outside and depth.get(phase.outside, 0):
                return fn(*args, **kwargs)
            depth[phase.name] = depth.get(phase.name, 0) + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[phase.name] -= 1
                if depth[phase.name] == 0:  # recursion or nested aliases count once
                    end = time.perf_counter()
                    calls.setdefault(phase.name, []).append((end, end - start))
        return timed

    for phase in PHASES:
        calls.setdefault(phase.name, [])
        if phase.recipe not in (None, recipe):
            continue
        try:
            owner = importlib.import_module(phase.module)
        except ImportError:
            continue
        *parents, name = phase.path.split(".")
        for part in parents:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            continue
        target = getattr(owner, name)
        if isinstance(target, dict):  # the text maskers, looked up by name at each example
            for key, fn in list(target.items()):
                target[key] = wrap(phase, fn)
        else:
            setattr(owner, name, wrap(phase, target))
    # The recipes bind `collate` at import: rebind theirs to the wrapped one.
    import interbert.data.batches as batches
    for module_name, _ in RECIPES.values():
        module = importlib.import_module(module_name)
        if hasattr(module, "collate"):
            module.collate = batches.collate


def child(args) -> None:
    import importlib

    import torch
    from torch.profiler import ProfilerActivity, profile

    if args.threads:
        torch.set_num_threads(args.threads)
    calls: dict[str, list[tuple[float, float]]] = {}
    _instrument(calls, args.recipe)
    step_ends: list[float] = []
    timed, total = args.warmup + args.steps, args.warmup + args.steps + args.profile_steps
    profiler = profile(activities=[ProfilerActivity.CPU])
    from interbert import train as train_module
    original_step = train_module.Trainer._optimizer_step

    def stepped(self, *a, **k):  # the step's end: after the update (logging follows in the next interval)
        out = original_step(self, *a, **k)
        step_ends.append(time.perf_counter())
        if args.profile_steps and len(step_ends) == timed:  # the timed window has ended: the profiled steps follow
            profiler.start()
        elif args.profile_steps and len(step_ends) == total:
            profiler.stop()
        return out

    train_module.Trainer._optimizer_step = stepped

    from interbert.recipes.common import load_recipe_config
    module_name, config = RECIPES[args.recipe]
    overrides = [f"data.captions={args.data}/captions.json", f"data.features={args.data}/regions.tsv",
                 f"train.max_steps={total}", f"train.output_dir={args.out}",
                 "train.progress_bar=false", "train.save_every=null"]
    cfg = load_recipe_config(Path(args.tree) / config, overrides)
    cfg["threads"] = args.threads or None
    importlib.import_module(module_name).run(cfg)
    if len(step_ends) != total:
        raise SystemExit(f"the run took {len(step_ends)} optimizer steps, not the {total} asked for")

    # The measured window: from the end of the last warm-up step to the end of the last timed step.
    start, end = step_ends[args.warmup - 1], step_ends[timed - 1]
    phases = {}
    for phase, records in calls.items():
        phases[phase] = sum(d for t, d in records if start < t <= end) / args.steps
    step = (end - start) / args.steps
    measured = phases["data: batch (all of it)"] + phases["update (all)"] + phases["forward (all)"] + phases["backward"]
    phases["other (logging, stats, loop)"] = max(0.0, step - measured)
    # common.profiler_table's rows, made here: common imports interbert, which in this process is the side's revision
    table = [(e.key, e.count, e.self_cpu_time_total) for e in profiler.key_averages()] if args.profile_steps else []
    print("RESULT " + json.dumps({"step_s": step, "steps": args.steps, "phases_s": phases,
                                  "threads": torch.get_num_threads(), "profiled_steps": args.profile_steps,
                                  "profile": table}))


# --------------------------------------------------------------------------------------------------
# Parent: the baseline worktree, the data, the alternation, the table
# --------------------------------------------------------------------------------------------------
def run_side(tree: Path, recipe: str, data: Path, args, out_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(REPO / "benchmarks")])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--recipe", recipe, "--tree", str(tree),
           "--data", str(data), "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out_dir),
           "--profile-steps", str(args.profile_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{recipe} in {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def aten_summary(sides: dict[str, list[dict]]) -> tuple[dict, list[str]]:
    """The profiled steps' aten ops of each side (JSON part, markdown lines): ops per step (the median over the
    side's runs; each run's figure is kept in the run, its profiler table dropped) and the top 5 by self CPU time
    over all of the side's profiled steps."""
    import statistics

    from common import aten_op_count, table, top_aten_ops

    tables = {side: [(r.pop("profile"), r["profiled_steps"]) for r in runs] for side, runs in sides.items()}
    if not all(steps for profiled in tables.values() for _, steps in profiled):  # --profile-steps 0
        return {}, []
    summary: dict = {"aten_ops_per_step": {}, "top_aten_ops": {}}
    for side, profiled in tables.items():
        runs = sides[side]
        for r, (rows, steps) in zip(runs, profiled):
            r["aten_ops_per_step"] = aten_op_count(rows) / steps
        summary["aten_ops_per_step"][side] = statistics.median(r["aten_ops_per_step"] for r in runs)
        summary["top_aten_ops"][side] = top_aten_ops([row for rows, _ in profiled for row in rows],
                                                     sum(steps for _, steps in profiled))
    counts, top = summary["aten_ops_per_step"], summary["top_aten_ops"]
    ops = table(["", "before", "after", "after / before"],
                [["**aten ops per step**", f"{counts['before']:.0f}", f"{counts['after']:.0f}",
                  f"{counts['after'] / counts['before']:.2f}x"]])
    rows = []
    for n, (b, a) in enumerate(itertools.zip_longest(top["before"], top["after"]), 1):
        rows.append([n, *(cell for op in (b, a) for cell in (
            (f"`{op['op']}`", f"{op['self_cpu_ms_per_step']:.2f}", f"{op['calls_per_step']:.1f}") if op else ("", "", "")))])
    tops = table(["#", "before: op", "self CPU ms/step", "calls/step", "after: op", "self CPU ms/step", "calls/step"], rows)
    return summary, [ops, "", "Top aten ops by self CPU time in the profiled steps (the profiler's overhead included):",
                     "", tops, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BASELINE, help="baseline git revision (default: %(default)s)")
    parser.add_argument("--data", type=Path, help="an `interbert data synth` folder (TSV with class probs); "
                        "default: generate --images into a temporary folder")
    parser.add_argument("--images", type=int, default=1050)
    parser.add_argument("--recipes", default="pretrain,retrieval")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of before/after per recipe")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps after the timed ones run under torch.profiler "
                        "to count aten ops (not timed; 0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as the configs)")
    parser.add_argument("--force", action="store_true", help="run even on a busy machine (results marked loaded)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results", help="folder for the results")
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import check_start_load, load_average, load_markdown, machine_info, machine_markdown, table

    load = check_start_load(args.force)
    if args.threads:  # the machine line reports the children's setting
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    commit_after = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    commit_before = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=REPO, capture_output=True,
                                   text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="profile_loop_") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "data"
            subprocess.run([sys.executable, "-m", "interbert.cli", "data", "synth", str(data), "--images", str(args.images),
                            "--format", "tsv"], check=True, capture_output=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        before_tree = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            results: dict[str, dict[str, list[dict]]] = {}
            for recipe in args.recipes.split(","):
                results[recipe] = {"before": [], "after": []}
                for n in range(args.rounds):
                    for side, tree in (("before", before_tree), ("after", REPO)):
                        # a fresh output folder per run: the TF-IDF cache of one side is not the other's set-up
                        res = run_side(tree, recipe, data, args, tmp / f"{recipe}_{side}_{n}")
                        results[recipe][side].append(res)
                        print(f"{recipe} {side} round {n}: {res['step_s'] * 1e3:.1f} ms/step", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=REPO, capture_output=True)
    load["load_average_at_end"] = load_average()

    import statistics

    def med(runs: list[dict], key: str | None = None) -> float:
        return statistics.median(r["step_s"] if key is None else r["phases_s"].get(key, 0.0) for r in runs)

    info = machine_info(load["load_average_at_start"])
    payload = {"machine": info, "load": load, "before": commit_before, "after": commit_after + ("+dirty" if dirty else ""),
               "settings": {k: v for k, v in vars(args).items() if k in ("steps", "warmup", "rounds", "threads", "images",
                                                                         "profile_steps")},
               "data": str(args.data or f"generated: {args.images} images"), "recipes": {},
               "seconds": time.perf_counter() - started}
    sections = [f"# Training loop profile: {commit_before} (before) vs {payload['after']} (after)", "",
                machine_markdown(info), load_markdown(load), "",
                f"{args.steps} steps measured after {args.warmup} warm-up steps, {args.rounds} alternating runs per side "
                "(medians); ms per step; the tiny configs as shipped on `interbert data synth` data "
                "(TSV with class probabilities). Phases are inclusive: `data: feature reads` is part of `data: batch`; "
                "the `forward:` passes are parts of `forward (all)`."
                + (f" aten ops: every `aten::` event torch.profiler (CPU activity) records in {args.profile_steps} more "
                   "steps after the timed ones (not timed), nested ones included, per step; median over runs."
                   if args.profile_steps else ""), ""]
    for recipe, sides in results.items():
        phases = list(dict.fromkeys(p for side in sides.values() for r in side for p in r["phases_s"]))
        rows = [["**step**", med(sides["before"]) * 1e3, med(sides["after"]) * 1e3,
                 f"{med(sides['before']) / med(sides['after']):.2f}x"]]
        for phase in phases:
            b, a = med(sides["before"], phase) * 1e3, med(sides["after"], phase) * 1e3
            if b < 0.05 and a < 0.05:
                continue
            rows.append([phase, b, a, "new" if b < 1e-4 else f"{b / a:.2f}x" if a > 1e-4 else "gone"])
        aten, aten_lines = aten_summary(sides)
        payload["recipes"][recipe] = {"runs": sides, "step_s": {s: med(r) for s, r in sides.items()},
                                      "speedup": med(sides["before"]) / med(sides["after"]), **aten}
        sections += [f"## {recipe}", "", table(["phase", "before ms/step", "after ms/step", "speedup"], rows), "",
                     *aten_lines]
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_loop.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "profile_loop.md").write_text("\n".join(sections).rstrip() + "\n")
    print("\n".join(sections))
    print(f"wrote {out / 'profile_loop.md'} and .json ({payload['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
