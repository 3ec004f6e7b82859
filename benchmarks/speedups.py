"""Before/after of each speed change, measured inside one run: the model file of a baseline git
revision is loaded next to the current one, both get the same weights, and their steps are timed
alternately on the same batches. Also checks that outputs agree at real positions.

    python benchmarks/speedups.py --baseline 5cc6875      # the commit before the change
    python benchmarks/speedups.py --baseline 5cc6875 --threads-sweep --compile
    python benchmarks/speedups.py --compile-only --threads 2   # add only the torch.compile trial

Writes benchmarks/results/speedups.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    check_start_load,
    machine_info,
    machine_markdown,
    median,
    pretraining_batch,
    real_positions,
    table,
    time_alternating,
    write_results,
)

from interbert import modeling  # noqa: E402
from interbert.config import preset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("text_sequence", "image_sequence", "text_pooled", "image_pooled", "itm_logits", "msm_logits", "mrm_class_logits")


def load_baseline_modeling(revision: str):
    source = subprocess.run(
        ["git", "show", f"{revision}:src/interbert/modeling.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_modeling.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_modeling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # transformers resolves type hints through sys.modules
    spec.loader.exec_module(module)
    return module


def train_step(model: torch.nn.Module, batch: dict) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def inference_step(model: torch.nn.Module, batch: dict) -> None:
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids", "region_features", "region_boxes", "region_mask")})


def max_difference_at_real_positions(before, after, batch: dict) -> float:
    # inputs only: with labels, today's last layers compute just the positions the heads read
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids",
                                                      "region_features", "region_boxes", "region_mask")}
    with torch.no_grad():
        a, b = before.eval()(**inputs), after.eval()(**inputs)
    text_keep, image_keep = batch["attention_mask"].bool(), batch["region_mask"].bool()
    worst = 0.0
    for name in OUTPUTS:
        x, y = getattr(a, name), getattr(b, name)
        # per-position outputs at real positions only: today's padded positions are zero (the packed layers
        # never compute them), so the head outputs there differ from the baseline's and nothing reads them
        if name in ("text_sequence", "msm_logits"):
            x, y = x[text_keep], y[text_keep]
        elif name in ("image_sequence", "mrm_class_logits"):
            x, y = x[image_keep], y[image_keep]
        worst = max(worst, float((x - y).abs().max()))
    return worst


def compare_padding(baseline, name: str, batch_size: int, iterations: int) -> dict:
    config = preset(name)
    torch.manual_seed(0)
    after = modeling.InterBertForPreTraining(config)
    before = baseline.InterBertForPreTraining(config)
    # the baseline builds both MRM decoders; today's model only the one config.mrm_target trains
    missing, unexpected = before.load_state_dict(after.state_dict(), strict=False)
    if unexpected or any(not key.startswith("mrm_feature_decoder.") for key in missing):
        raise RuntimeError(f"baseline and current weights differ beyond the MRM decoder: {missing} {unexpected}")
    batches = [pretraining_batch(config, batch_size, seed=s) for s in range(2)]
    difference = max_difference_at_real_positions(before, after, batches[0])
    before.train(), after.train()
    train = time_alternating(
        {"before": lambda i: train_step(before, batches[i % 2]), "after": lambda i: train_step(after, batches[i % 2])},
        warmup=1, iterations=iterations,
    )
    before.eval(), after.eval()
    infer = time_alternating(
        {"before": lambda i: inference_step(before, batches[i % 2]), "after": lambda i: inference_step(after, batches[i % 2])},
        warmup=1, iterations=iterations,
    )
    pairs = lambda t: median([b / a for b, a in zip(t["before"], t["after"])])  # noqa: E731
    return {
        "preset": name,
        "batch_size": batch_size,
        "iterations": iterations,
        "real_position_fraction": sum(real_positions(b) for b in batches) / 2,
        "max_abs_difference_at_real_positions": difference,
        "train_step_s": {k: median(v) for k, v in train.items()},
        "train_speedup": pairs(train),
        "inference_s": {k: median(v) for k, v in infer.items()},
        "inference_speedup": pairs(infer),
    }


def threads_sweep(name: str, batch_size: int, iterations: int, counts: tuple[int, ...] = (1, 2)) -> dict:
    config = preset(name)
    torch.manual_seed(0)
    model = modeling.InterBertForPreTraining(config).train()
    batches = [pretraining_batch(config, batch_size, seed=s) for s in range(2)]

    def with_threads(n: int):
        def step(i: int) -> None:
            torch.set_num_threads(n)
            train_step(model, batches[i % 2])
        return step

    times = time_alternating({f"{n} threads": with_threads(n) for n in counts}, warmup=1, iterations=iterations)
    torch.set_num_threads(max(counts))
    return {"preset": name, "batch_size": batch_size, "iterations": iterations, "train_step_s": {k: median(v) for k, v in times.items()}}


def compile_trial(name: str, batch_size: int, iterations: int) -> dict:
    """torch.compile of each transformer layer (the graph-break-free part: packing uses nonzero)."""
    config = preset(name)
    torch.manual_seed(0)
    eager = modeling.InterBertForPreTraining(config).train()
    compiled = modeling.InterBertForPreTraining(config).train()
    compiled.load_state_dict(eager.state_dict())
    batches = [pretraining_batch(config, batch_size, seed=s) for s in range(2)]
    model = compiled.interbert
    for stack in (model.single_stream, model.text_stream, model.image_stream):
        for layer in stack:
            layer.compile(dynamic=True)
    start = time.perf_counter()
    for b in batches:  # each new shape may compile
        train_step(compiled, b)
    compile_s = time.perf_counter() - start
    times = time_alternating(
        {"eager": lambda i: train_step(eager, batches[i % 2]), "compiled": lambda i: train_step(compiled, batches[i % 2])},
        warmup=1, iterations=iterations,
    )
    return {
        "preset": name, "batch_size": batch_size, "iterations": iterations,
        "first_steps_with_compilation_s": compile_s,
        "train_step_s": {k: median(v) for k, v in times.items()},
        "speedup": median([e / c for e, c in zip(times["eager"], times["compiled"])]),
    }


def markdown(payload: dict) -> str:
    parts = [
        "# Speed changes: before/after in one run",
        machine_markdown(payload["machine"]),
        f"Baseline: `src/interbert/modeling.py` at `{payload['baseline']}` loaded next to the working tree's; same "
        "weights, same batches (captions 8-36 tokens, 10-36 regions + global, dynamic padding), steps timed "
        "alternately; speed-up = median over iterations of before/after.",
        "## Per-position work on real positions only (`Padding` in modeling.py)",
        table(
            ["preset", "batch", "real positions", "train s/step before", "after", "train speed-up",
             "no_grad forward s before", "after", "inference speed-up", "max |diff| at real positions"],
            [[r["preset"], r["batch_size"], f"{100 * r['real_position_fraction']:.0f}%", r["train_step_s"]["before"],
              r["train_step_s"]["after"], r["train_speedup"], r["inference_s"]["before"], r["inference_s"]["after"],
              r["inference_speedup"], f"{r['max_abs_difference_at_real_positions']:.1e}"] for r in payload["padding"]],
        ),
    ]
    if payload.get("threads"):
        parts += ["## Threads", table(
            ["preset", "batch", *payload["threads"][0]["train_step_s"].keys()],
            [[r["preset"], r["batch_size"], *r["train_step_s"].values()] for r in payload["threads"]],
        )]
    if payload.get("compile"):
        trial = payload["compile"][0]
        if "machine" in trial:  # measured in a later run than the tables above
            m = trial["machine"]
            parts += [f"## torch.compile (opt-in: `layer.compile()` on each transformer layer)\n\nMeasured separately "
                      f"(`--compile-only`): {m.get('cpu', '?')}, torch {m.get('torch', '?')} with {trial['threads']} "
                      f"threads, {m.get('date', '?')}; 1-min load average at the end {trial['load_average_at_end']:.2f}."]
        else:
            parts += ["## torch.compile (opt-in: `layer.compile()` on each transformer layer)"]
        parts += [table(
            ["preset", "batch", "first 2 steps incl. compilation s", "eager s/step", "compiled s/step", "speed-up"],
            [[r["preset"], r["batch_size"], r["first_steps_with_compilation_s"], r["train_step_s"]["eager"],
              r["train_step_s"]["compiled"], r["speedup"]] for r in payload["compile"]],
        )]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="git revision whose modeling.py is 'before' (required unless --compile-only)")
    parser.add_argument("--compile-only", action="store_true",
                        help="run only the torch.compile trial and add it to the existing speedups.json/.md")
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads-sweep", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="run on a busy machine (results marked loaded)")
    args = parser.parse_args(argv)
    load = check_start_load(args.force)

    torch.set_num_threads(args.threads)
    if args.compile_only:
        payload = json.loads((RESULTS / "speedups.json").read_text())
        trial = compile_trial("tiny", 32, args.iterations)
        payload["compile"] = [{**trial, "machine": machine_info(), "threads": args.threads,
                               "load_average_at_end": os.getloadavg()[0]}]
        print("compile", payload["compile"], flush=True)
        print("wrote", *write_results("speedups", payload, markdown(payload)))
        return 0
    if not args.baseline:
        parser.error("--baseline is required (or --compile-only)")
    baseline = load_baseline_modeling(args.baseline)
    sizes = {"tiny": 32, "base": 4}
    payload = {"machine": machine_info(), "load": load, "baseline": args.baseline, "padding": []}
    for name in args.presets:
        r = compare_padding(baseline, name, sizes[name], args.iterations)
        print(f"{name}: train x{r['train_speedup']:.2f}, inference x{r['inference_speedup']:.2f}, "
              f"max diff {r['max_abs_difference_at_real_positions']:.1e}", flush=True)
        payload["padding"].append(r)
    if args.threads_sweep:
        payload["threads"] = [threads_sweep("tiny", 32, args.iterations)]
        torch.set_num_threads(args.threads)
        print("threads", payload["threads"], flush=True)
    if args.compile:
        payload["compile"] = [compile_trial("tiny", 32, args.iterations)]
        print("compile", payload["compile"], flush=True)
    payload["load_average_at_end"] = os.getloadavg()[0]
    print("wrote", *write_results("speedups", payload, markdown(payload)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
