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
forward+backward and optimizer update (logging, loss statistics, progress). Writes
benchmarks/results/profile_loop.{json,md}; refuses to start above a 1-minute load average of 1.0
unless --force (results then marked loaded).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "650bf18"  # main when issue 14's work began
RECIPES = {
    "pretrain": ("interbert.recipes.pretrain", "configs/pretrain_tiny.yaml"),
    "retrieval": ("interbert.recipes.finetune_retrieval", "configs/finetune_retrieval_tiny.yaml"),
}
# (phase, module, attribute path): a function is wrapped where callers look it up.
PHASES = [
    ("data: batch (all of it)", "interbert.train", "_SeededBatches.__getitem__"),
    ("data: feature reads", "interbert.data.features", "FeatureStore.__getitem__"),
    ("data: region preparation", "interbert.data.batches", "prepare_regions"),
    ("data: tokenize", "interbert.data.batches", "encode_caption"),
    ("data: MSM masking", "interbert.data.batches", "apply_token_masking"),
    ("data: MSM spans", "interbert.data.masking", "TEXT_MASKERS"),
    ("data: MRM IoU groups", "interbert.data.batches", "mask_region_groups"),
    ("data: MRM regions", "interbert.data.batches", "mask_regions_independently"),
    ("data: MRM zeroing", "interbert.data.batches", "apply_region_masking"),
    ("data: negatives", "interbert.data.batches", "sample_itm_caption"),
    ("data: negatives", "interbert.data.batches", "random_other_image_caption"),
    ("data: collate", "interbert.data.batches", "collate"),
    ("forward (all)", "interbert.modeling", "InterBertForPreTraining.forward"),
    ("forward (all)", "interbert.modeling", "InterBertForImageTextRetrieval.forward"),
    ("forward: ITC passes", "interbert.modeling", "InterBertModel.contrastive_loss"),
    ("backward", "torch", "Tensor.backward"),
    ("update (all)", "interbert.train", "Trainer._optimizer_step"),
    ("update: clip grad norm", "torch.nn.utils", "clip_grad_norm_"),
    ("update: EMA", "interbert.train", "ExponentialMovingAverage.update"),
    ("logging: loss stats", "interbert.train", "Trainer._reduce_step_stats"),
    ("logging: tensorboard", "interbert.train", "Trainer._write_scalars"),  # before train/ became a package
    ("logging: tensorboard", "interbert.train.reporting", "write_scalars"),  # before train.report_to
    ("logging: tensorboard", "interbert.train.reporting", "Reporter.log"),  # report_to's trackers (TensorBoard by default)
]


# --------------------------------------------------------------------------------------------------
# Child: one recipe on one side, instrumented
# --------------------------------------------------------------------------------------------------
def _instrument(calls: dict[str, list[tuple[float, float]]]) -> None:
    """Wrap every function of PHASES to record (end time, duration) of each call, outermost only."""
    import importlib

    depth: dict[str, int] = {}

    def wrap(phase: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth[phase] = depth.get(phase, 0) + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[phase] -= 1
                if depth[phase] == 0:  # recursion or nested aliases count once
                    end = time.perf_counter()
                    calls.setdefault(phase, []).append((end, end - start))
        return timed

    for phase, module_name, path in PHASES:
        calls.setdefault(phase, [])
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, name = path.split(".")
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

    if args.threads:
        torch.set_num_threads(args.threads)
    calls: dict[str, list[tuple[float, float]]] = {}
    _instrument(calls)
    step_ends: list[float] = []
    from interbert import train as train_module
    original_step = train_module.Trainer._optimizer_step

    def stepped(self, *a, **k):  # the step's end: after the update (logging follows in the next interval)
        out = original_step(self, *a, **k)
        step_ends.append(time.perf_counter())
        return out

    train_module.Trainer._optimizer_step = stepped

    from interbert.recipes.common import load_recipe_config
    module_name, config = RECIPES[args.recipe]
    overrides = [f"data.captions={args.data}/captions.json", f"data.features={args.data}/regions.tsv",
                 f"train.max_steps={args.warmup + args.steps}", f"train.output_dir={args.out}",
                 "train.progress_bar=false", "train.save_every=null"]
    cfg = load_recipe_config(Path(args.tree) / config, overrides)
    cfg["threads"] = args.threads or None
    importlib.import_module(module_name).run(cfg)

    # The measured window: from the end of the last warm-up step to the end of the last step.
    start, end = step_ends[args.warmup - 1], step_ends[-1]
    steps = len(step_ends) - args.warmup
    phases = {}
    for phase, records in calls.items():
        phases[phase] = sum(d for t, d in records if start < t <= end) / steps
    step = (end - start) / steps
    measured = phases["data: batch (all of it)"] + phases["update (all)"] + phases["forward (all)"] + phases["backward"]
    phases["other (logging, stats, loop)"] = max(0.0, step - measured)
    print("RESULT " + json.dumps({"step_s": step, "steps": steps, "phases_s": phases,
                                  "threads": torch.get_num_threads()}))


# --------------------------------------------------------------------------------------------------
# Parent: the baseline worktree, the data, the alternation, the table
# --------------------------------------------------------------------------------------------------
def run_side(tree: Path, recipe: str, data: Path, args, out_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(REPO / "benchmarks")])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--recipe", recipe, "--tree", str(tree),
           "--data", str(data), "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out_dir)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{recipe} in {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


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
               "settings": {k: v for k, v in vars(args).items() if k in ("steps", "warmup", "rounds", "threads", "images")},
               "data": str(args.data or f"generated: {args.images} images"), "recipes": {},
               "seconds": time.perf_counter() - started}
    sections = [f"# Training loop profile: {commit_before} (before) vs {payload['after']} (after)", "",
                machine_markdown(info), load_markdown(load), "",
                f"{args.steps} steps measured after {args.warmup} warm-up steps, {args.rounds} alternating runs per side "
                "(medians); ms per step; the tiny configs as shipped on `interbert data synth` data "
                "(TSV with class probabilities). Phases are inclusive: `data: feature reads` is part of `data: batch`.", ""]
    for recipe, sides in results.items():
        phases = list(dict.fromkeys(p for side in sides.values() for r in side for p in r["phases_s"]))
        rows = [["**step**", med(sides["before"]) * 1e3, med(sides["after"]) * 1e3,
                 f"{med(sides['before']) / med(sides['after']):.2f}x"]]
        for phase in phases:
            b, a = med(sides["before"], phase) * 1e3, med(sides["after"], phase) * 1e3
            if b < 0.05 and a < 0.05:
                continue
            rows.append([phase, b, a, f"{b / a:.2f}x" if a > 1e-4 else "gone"])
        payload["recipes"][recipe] = {"runs": sides, "step_s": {s: med(r) for s, r in sides.items()},
                                      "speedup": med(sides["before"]) / med(sides["after"])}
        sections += [f"## {recipe}", "", table(["phase", "before ms/step", "after ms/step", "speedup"], rows), ""]
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_loop.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "profile_loop.md").write_text("\n".join(sections).rstrip() + "\n")
    print("\n".join(sections))
    print(f"wrote {out / 'profile_loop.md'} and .json ({payload['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
