"""Eager vs torch.compile'd pretraining step (forward + backward) with length buckets on (issue 26).

    python benchmarks/compiled_step.py                          # tiny (batch 32) and base (batch 4), idle machine
    python benchmarks/compiled_step.py --presets tiny --steps 2 --no-write    # a smoke run

Five sides, timed alternately on the same bucketed batches (each batch padded up to the smallest of a few
lengths chosen from the batches' length histogram, as ``data.length_buckets: auto`` does):

- ``eager``: the default mode (real positions packed, masked positions selected), what runs today;
- ``eager_static``: the static-shape mode (``model.set_static_shapes``: pad masked, not removed) without
  compiling, the price of the static shapes alone;
- ``eager_static_budget``: the static-shape mode on batches with ``msm_positions``, the masked tokens padded
  to a budget per text bucket (``data.msm_budget: auto``), so the MSM head runs on those rows only;
- ``compiled``: the static-shape mode through ``torch.compile(mode="default", dynamic=False)``;
- ``compiled_budget``: the same on the budgeted batches (what ``train.compile`` with buckets runs).

The compile time (the first call of each shape, beyond a compiled step's time) is reported, and an
end-to-end figure includes it: seconds for a ``--run-steps`` run (800, the issue's) of each side. The
budgeted sides' shapes are (text, regions, budget): their count against the buckets' says how many graphs the
budget adds. The aten ops per step (every ``aten::`` event torch.profiler records in one forward + backward,
nested ones included) are counted for the eager and static sides. Writes
benchmarks/results/compiled_step{_TAG}.json and .md; refuses a busy machine (load rule of common.py)
unless --force.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import (  # noqa: E402
    aten_ops_per_step,
    check_start_load,
    load_markdown,
    machine_info,
    machine_markdown,
    median,
    pretraining_batch,
    table,
    time_alternating,
    write_results,
)

from interbert.config import preset  # noqa: E402
from interbert.data.batches import bucket_edges, bucket_length, masked_count_budgets, masked_positions  # noqa: E402
from interbert.modeling import InterBertForPreTraining  # noqa: E402

# the value each padded input takes (labels: ignored; masks: not kept)
PAD = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "msm_labels": -100, "region_features": 0.0,
       "region_boxes": 0.0, "region_mask": 0, "mrm_mask": False, "mrm_class_targets": 0.0, "mrm_feature_targets": 0.0}
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "msm_labels")


def bucketed(batch: dict, text_edges: list[int], region_edges: list[int]) -> dict:
    """``batch`` padded along its length dimension up to the smallest edge that fits (what collate does)."""
    out = dict(batch)
    t = bucket_length(batch["input_ids"].shape[1], text_edges)
    r = bucket_length(batch["region_features"].shape[1], region_edges)
    for key, value in batch.items():
        if key not in PAD or not isinstance(value, torch.Tensor):
            continue
        length = t if key in TEXT_KEYS else r
        pad = [0, 0] * (value.dim() - 2) + [0, length - value.shape[1]]
        out[key] = F.pad(value, pad, value=PAD[key])
    return out


def bucketed_batches(config, batch_size: int, n_batches: int) -> tuple[list[dict], dict]:
    batches = [pretraining_batch(config, batch_size, seed=s) for s in range(n_batches)]
    text_lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    region_counts = [int(n) for b in batches for n in b["region_mask"].sum(1)]
    edges = {"text": bucket_edges(text_lengths), "regions": bucket_edges(region_counts)}
    return [bucketed(b, edges["text"], edges["regions"]) for b in batches], edges


def budgeted(batches: list[dict], text_edges: list[int]) -> tuple[list[dict], dict[int, int]]:
    """``batches`` with ``msm_positions``, budgets per text bucket from their captions' masked-count histogram
    (what ``data.msm_budget: auto`` does with a dataset's)."""
    masked = [b["msm_labels"] != -100 for b in batches]
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    budgets = masked_count_budgets(lengths, [int(n) for m in masked for n in m.sum(1)], len(batches[0]["input_ids"]),
                                   text_edges)
    return [{**b, "msm_positions": masked_positions(b["msm_labels"], budgets)} for b in batches], budgets


def shape_of(batch: dict) -> tuple[int, ...]:
    """What a compiled step specialises on: text and region lengths, and the budget when there is one."""
    budget = (batch["msm_positions"].shape[0],) if "msm_positions" in batch else ()
    return (batch["input_ids"].shape[1], batch["region_features"].shape[1], *budget)


def step(model, batch: dict) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def first_calls(module, batches: list[dict]) -> list[float]:
    """Seconds of the first call of each shape of ``batches`` (compiled: each one compiles), in shape order."""
    seconds = []
    for shape in sorted({shape_of(b) for b in batches}):
        batch = next(b for b in batches if shape_of(b) == shape)
        start = time.perf_counter()
        step(module, batch)
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_preset(name: str, batch_size: int, n_batches: int, warmup: int, steps: int, run_steps: int) -> dict:
    """The five sides of one preset: compiled, timed alternately, their aten ops counted."""
    config = preset(name)
    torch.manual_seed(0)
    model = InterBertForPreTraining(config).train()
    batches, edges = bucketed_batches(config, batch_size, n_batches)
    with_budget, budgets = budgeted(batches, edges["text"])
    data = {"eager": batches, "eager_static": batches, "eager_static_budget": with_budget, "compiled": batches,
            "compiled_budget": with_budget}
    static_mode = {"eager": False, "eager_static": True, "eager_static_budget": True, "compiled": True,
                   "compiled_budget": True}
    # Both compiled sides are one torch.compile of one forward: dynamo keeps a graph per shape, (text, regions)
    # and (text, regions, budget), more than its default limit of 8 recompiles.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(model, mode="default", dynamic=False)
    modules = {side: compiled if side.startswith("compiled") else model for side in data}

    # Compile: the first call of each shape compiles (and recompiles on a new one); timed call by call. The
    # budgeted side first: what train.compile runs pays inductor's one-time start-up in its figure.
    model.set_static_shapes(True)
    first = {side: first_calls(compiled, data[side]) for side in ("compiled_budget", "compiled")}

    def side(name: str):
        def run(i: int) -> None:
            model.set_static_shapes(static_mode[name])
            step(modules[name], data[name][i % len(data[name])])
        return run

    times = time_alternating({name: side(name) for name in data}, warmup, steps)
    per_step = {k: median(v) for k, v in times.items()}
    compile_seconds = {k: max(0.0, sum(first[k]) - len(first[k]) * per_step[k]) for k in first}
    end_to_end = {k: run_steps * v + compile_seconds.get(k, 0.0) for k, v in per_step.items()}
    aten_ops = {k: aten_ops_per_step(side(k)) for k in ("eager", "eager_static", "eager_static_budget")}
    return {
        "preset": name, "batch_size": batch_size, "bucket_edges": edges, "msm_budgets": budgets,
        "shapes": [list(s) for s in sorted({shape_of(b) for b in batches})],
        "budget_shapes": [list(s) for s in sorted({shape_of(b) for b in with_budget})],
        "seconds": times, "steps_per_s": {k: 1 / v for k, v in per_step.items()},
        "compile_seconds": compile_seconds["compiled"], "compile_seconds_budget": compile_seconds["compiled_budget"],
        "first_call_seconds": first["compiled"], "first_call_seconds_budget": first["compiled_budget"],
        "run_steps": run_steps, "end_to_end_seconds": end_to_end, "aten_ops_per_step": aten_ops,
        "speedup_compiled_over_eager": per_step["eager"] / per_step["compiled"],
        "speedup_compiled_budget_over_eager": per_step["eager"] / per_step["compiled_budget"],
        "end_to_end_speedup_compiled_over_eager": end_to_end["eager"] / end_to_end["compiled"],
        "end_to_end_speedup_compiled_budget_over_eager": end_to_end["eager"] / end_to_end["compiled_budget"],
    }


def markdown(payload: dict) -> str:
    rows = [[r["preset"], r["batch_size"], f"{r['bucket_edges']['text']} / {r['bucket_edges']['regions']}",
             r["steps_per_s"]["eager"], r["steps_per_s"]["eager_static"], r["steps_per_s"]["compiled"],
             r["speedup_compiled_over_eager"], r["compile_seconds"], r["end_to_end_seconds"]["eager"],
             r["end_to_end_seconds"]["compiled"], r["end_to_end_speedup_compiled_over_eager"]]
            for r in payload["presets"]]
    budget_rows = [[r["preset"], r["batch_size"], r["msm_budgets"], f"{len(r['shapes'])} / {len(r['budget_shapes'])}",
                    r["steps_per_s"]["eager"], r["steps_per_s"]["eager_static_budget"],
                    r["steps_per_s"]["compiled_budget"], r["speedup_compiled_budget_over_eager"],
                    r["compile_seconds_budget"], r["end_to_end_seconds"]["compiled_budget"],
                    r["end_to_end_speedup_compiled_budget_over_eager"],
                    " / ".join(f"{r['aten_ops_per_step'][k]:.0f}" for k in ("eager", "eager_static", "eager_static_budget"))]
                   for r in payload["presets"]]
    return "\n\n".join([
        "# Compiled pretraining step (issue 26)",
        "Eager (default mode), eager in the static-shape mode, and torch.compile(mode='default', dynamic=False) "
        "in the static-shape mode, forward + backward, on the same batches padded to length buckets, timed "
        f"alternately ({payload['steps']} timed steps per side). End to end: a {payload['run_steps']}-step run, "
        "compile time included.",
        table(["preset", "batch", "buckets text / regions", "eager steps/s", "eager static steps/s",
               "compiled steps/s", "compiled / eager", "compile s", f"eager {payload['run_steps']} steps s",
               f"compiled {payload['run_steps']} steps s (incl. compile)", "end to end compiled / eager"], rows),
        "With the masked-token budget (`msm_positions`, `data.msm_budget: auto`): the static-shape mode runs the "
        "MSM head on the budget's rows only, a budget per text bucket from the masked-count histogram (a batch "
        "above it takes the full B x T). Shapes: (text, regions) without the budget / (text, regions, budget) "
        "with it, the graphs a compiled run builds. aten ops per step: every aten event torch.profiler records "
        "in one forward + backward, nested ones included.",
        table(["preset", "batch", "budgets per text bucket", "shapes", "eager steps/s", "eager static + budget steps/s",
               "compiled + budget steps/s", "compiled + budget / eager", "compile s",
               f"compiled + budget {payload['run_steps']} steps s (incl. compile)",
               "end to end compiled + budget / eager", "aten ops per step eager / static / static + budget"],
              budget_rows),
        machine_markdown(payload["machine"]) + " " + load_markdown(payload["load"]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--batch-size-tiny", type=int, default=32)
    parser.add_argument("--batch-size-base", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6, help="distinct batches (their buckets are the shapes)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side after compiling")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--run-steps", type=int, default=800, help="the run length of the end-to-end figure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--force", action="store_true", help="run on a busy machine (results marked loaded)")
    parser.add_argument("--no-write", action="store_true", help="print only (a smoke run)")
    args = parser.parse_args(argv)
    load = check_start_load(args.force or args.no_write)

    torch.set_num_threads(args.threads)
    payload = {"machine": machine_info(load["load_average_at_start"]), "load": load, "tag": args.tag,
               "steps": args.steps, "run_steps": args.run_steps, "presets": []}
    for name in args.presets:
        batch_size = args.batch_size_tiny if name == "tiny" else args.batch_size_base
        result = bench_preset(name, batch_size, args.batches, args.warmup, args.steps, args.run_steps)
        payload["presets"].append(result)
        s, ops = result["steps_per_s"], result["aten_ops_per_step"]
        print(f"{name}: eager {s['eager']:.2f} steps/s, eager static {s['eager_static']:.2f}, compiled "
              f"{s['compiled']:.2f} ({result['speedup_compiled_over_eager']:.2f}x), compile "
              f"{result['compile_seconds']:.1f} s, {args.run_steps} steps end to end "
              f"{result['end_to_end_speedup_compiled_over_eager']:.2f}x", flush=True)
        print(f"{name} with the masked-token budget {result['msm_budgets']}: eager static "
              f"{s['eager_static_budget']:.2f} steps/s, compiled {s['compiled_budget']:.2f} "
              f"({result['speedup_compiled_budget_over_eager']:.2f}x), compile {result['compile_seconds_budget']:.1f} s, "
              f"{args.run_steps} steps end to end {result['end_to_end_speedup_compiled_budget_over_eager']:.2f}x; "
              f"shapes {len(result['shapes'])} -> {len(result['budget_shapes'])}; aten ops per step eager "
              f"{ops['eager']:.0f}, static {ops['eager_static']:.0f}, static + budget {ops['eager_static_budget']:.0f}",
              flush=True)
    load["load_average_at_end"] = os.getloadavg()[0]
    if args.no_write:
        return 0
    name = "compiled_step" + (f"_{args.tag}" if args.tag else "")
    print("wrote", *write_results(name, payload, markdown(payload)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
