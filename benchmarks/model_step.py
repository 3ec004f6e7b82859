"""Pretraining step (forward + backward) of InterBERT against transformers' VisualBERT at equal work,
and model FLOPs utilisation against this machine's measured fp32 matmul peak.

    python benchmarks/model_step.py                      # tiny (batch 32) and base (batch 4)
    python benchmarks/model_step.py --presets tiny --iterations 3

Equal work: InterBERT runs S layers over [regions ; text] and T + I layers over each modality alone;
VisualBERT gets the layer count with the same token-layers per example (12 at base, 4 at tiny), the
same hidden size, heads, FFN width, sequence lengths and padding, its 2048-d visual embedding and
its own losses (MLM over every position + sentence-image prediction). FLOPs are counted by torch's
FlopCounterMode on the real step of each model, so the MFU figures count the work each model does,
padding included. Writes benchmarks/results/model_step{_TAG}.json and .md.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import (  # noqa: E402
    check_start_load,
    count_flops,
    equal_work_visualbert_layers,
    machine_info,
    machine_markdown,
    matmul_peak_gflops,
    median,
    pretraining_batch,
    real_positions,
    table,
    time_alternating,
    visualbert_batch,
    visualbert_for,
    write_results,
)

from interbert.config import preset  # noqa: E402
from interbert.modeling import InterBertForPreTraining  # noqa: E402

TOKENS, REGIONS = 36, 36  # + the global region


def train_step(model: torch.nn.Module, batch: dict) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def bench_preset(name: str, batch_size: int, warmup: int, iterations: int, n_batches: int, peak_gflops: float) -> dict:
    config = preset(name)
    torch.manual_seed(0)
    interbert = InterBertForPreTraining(config).train()
    layers = equal_work_visualbert_layers(config, TOKENS, REGIONS + 1)
    visualbert = visualbert_for(config, layers).train()
    batches = [pretraining_batch(config, batch_size, seed=s, max_tokens=TOKENS, max_regions=REGIONS) for s in range(n_batches)]
    vb_batches = [visualbert_batch(b) for b in batches]

    flops = {
        "interbert": sum(count_flops(lambda b=b: train_step(interbert, b)) for b in batches) / n_batches,
        "visualbert": sum(count_flops(lambda b=b: train_step(visualbert, b)) for b in vb_batches) / n_batches,
    }
    # The FLOP-counting steps above double as warm-up. A 2048^3 matmul is timed between the steps so
    # that MFU can also be stated against the peak under the same background load.
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    times = time_alternating(
        {
            "interbert": lambda i: train_step(interbert, batches[i % n_batches]),
            "visualbert": lambda i: train_step(visualbert, vb_batches[i % n_batches]),
            "matmul": lambda i: torch.mm(a, b),
        },
        warmup=warmup,
        iterations=iterations,
    )
    peak_under_load = 2 * 2048**3 / median(times["matmul"]) / 1e9
    models = {}
    for model_name in ("interbert", "visualbert"):
        seconds = median(times[model_name])
        achieved = flops[model_name] / seconds / 1e9
        models[model_name] = {
            "seconds_per_step_median": seconds,
            "seconds_per_step_all": times[model_name],
            "examples_per_s": batch_size / seconds,
            "gflop_per_example": flops[model_name] / batch_size / 1e9,
            "achieved_gflops": achieved,
            "mfu": achieved / peak_gflops,
            "mfu_vs_peak_under_same_load": achieved / peak_under_load,
        }
    # ratio of medians of the per-iteration ratios is robust to a slow interval hitting one pair
    pair_ratios = [v / i for i, v in zip(times["interbert"], times["visualbert"])]
    return {
        "preset": name,
        "batch_size": batch_size,
        "warmup": warmup,
        "iterations": iterations,
        "distinct_batches": n_batches,
        "padded_shapes": [[int(b["region_mask"].shape[1]), int(b["input_ids"].shape[1])] for b in batches],
        "real_position_fraction": sum(real_positions(b) for b in batches) / n_batches,
        "visualbert_layers": layers,
        "matmul_gflops_interleaved": peak_under_load,
        "interbert_parameters": sum(p.numel() for p in interbert.parameters()),
        "visualbert_parameters": sum(p.numel() for p in visualbert.parameters()),
        "models": models,
        "speed_ratio_interbert_over_visualbert": models["interbert"]["examples_per_s"] / models["visualbert"]["examples_per_s"],
        "speed_ratio_median_of_pairs": median(pair_ratios),
    }


def markdown(payload: dict) -> str:
    rows = []
    for r in payload["presets"]:
        for m in ("interbert", "visualbert"):
            x = r["models"][m]
            rows.append([
                r["preset"], m if m == "interbert" else f"visualbert ({r['visualbert_layers']} layers)", r["batch_size"],
                x["seconds_per_step_median"], x["examples_per_s"], x["gflop_per_example"], x["achieved_gflops"],
                f"{100 * x['mfu']:.1f}%", f"{100 * x['mfu_vs_peak_under_same_load']:.1f}%",
            ])
    ratios = [
        [r["preset"], r["speed_ratio_interbert_over_visualbert"], r["speed_ratio_median_of_pairs"],
         f"{100 * r['real_position_fraction']:.0f}%", " ".join(f"{a}+{b}" for a, b in r["padded_shapes"])]
        for r in payload["presets"]
    ]
    peak = payload["matmul_peak"]
    return "\n\n".join([
        f"# Pretraining step: InterBERT vs VisualBERT at equal work{' (' + payload['tag'] + ')' if payload['tag'] else ''}",
        machine_markdown(payload["machine"]) + f" 1-min load average at the end: {payload['load_average_at_end']:.2f} "
        "(other processes share these cores: absolute rates move with the load, ratios much less).",
        f"fp32 matmul peak measured in this run: **{peak['gflops']:.1f} GFLOP/s** "
        f"(square torch.mm, {', '.join(f'{n}: {g:.1f}' for n, g in peak['by_size'].items())}); "
        "a 2048 matmul timed between the steps gives the peak under the same background load: "
        + ", ".join(f"{r['preset']} {r['matmul_gflops_interleaved']:.1f}" for r in payload["presets"]) + " GFLOP/s.",
        "Forward + backward (no optimizer step), MSM + MRM (KL to class distributions) + ITM for InterBERT, "
        "MLM over all positions + sentence-image prediction for VisualBERT. Medians over "
        f"{payload['presets'][0]['iterations']} timed iterations after warm-up, the two models timed alternately.",
        table(["preset", "model", "batch", "s/step", "examples/s", "GFLOP/example", "achieved GFLOP/s", "MFU", "MFU vs interleaved peak"], rows),
        table(["preset", "examples/s ratio InterBERT / VisualBERT", "median of per-pair ratios", "real positions", "padded regions+tokens per batch"], ratios),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--batch-size-tiny", type=int, default=32)
    parser.add_argument("--batch-size-base", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=0, help="extra warm-up steps (the FLOP count is one already)")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per model (base uses min(this, 3))")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the results files (e.g. 'before')")
    parser.add_argument("--force", action="store_true", help="run on a busy machine (results marked loaded)")
    args = parser.parse_args(argv)
    load = check_start_load(args.force)

    torch.set_num_threads(args.threads)
    payload = {"machine": machine_info(), "load": load, "tag": args.tag, "matmul_peak": matmul_peak_gflops(), "presets": []}
    for name in args.presets:
        batch_size = args.batch_size_tiny if name == "tiny" else args.batch_size_base
        iterations = args.iterations if name == "tiny" else min(args.iterations, 3)
        n_batches = 3 if name == "tiny" else 2
        result = bench_preset(name, batch_size, args.warmup, iterations, n_batches, payload["matmul_peak"]["gflops"])
        payload["presets"].append(result)
        ib, vb = result["models"]["interbert"], result["models"]["visualbert"]
        print(
            f"{name}: InterBERT {ib['examples_per_s']:.2f} ex/s (MFU {100 * ib['mfu']:.1f}%), "
            f"VisualBERT {vb['examples_per_s']:.2f} ex/s, ratio {result['speed_ratio_interbert_over_visualbert']:.2f}",
            flush=True,
        )
    payload["load_average_at_end"] = __import__("os").getloadavg()[0]
    name = "model_step" + (f"_{args.tag}" if args.tag else "")
    paths = write_results(name, payload, markdown(payload))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
