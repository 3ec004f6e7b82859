"""Peak resident memory (ru_maxrss) of a `base` pretraining step, with and without gradient checkpointing,
and of retrieval-style pair scoring, each measured in a fresh subprocess so that one number does not
include the other's peak.

    python benchmarks/memory.py                         # train batch 32, scoring 64 pairs per batch
    python benchmarks/memory.py --pair-batch-size 512

The two `base` steps start from the same weights, batch and dropout seed: their losses and gradient norms
must agree (checkpointing recomputes the same activations). Peak RSS does not depend on the machine's
load (timings would); the 1-minute load average is recorded before and after all the same.

Writes benchmarks/results/memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import load_average, machine_info, machine_markdown, pretraining_batch, table, write_results  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_train(preset_name: str, batch_size: int, gradient_checkpointing: bool = False) -> dict:
    from interbert.config import preset
    from interbert.modeling import InterBertForPreTraining
    from interbert.train import enable_gradient_checkpointing

    config = preset(preset_name)
    batch = pretraining_batch(config, batch_size, seed=0)
    phases = {"imports_and_batch": peak_mib()}
    torch.manual_seed(0)
    model = InterBertForPreTraining(config).train()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    phases["model_built"] = peak_mib()
    torch.manual_seed(1)  # the same dropout masks with and without checkpointing
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    seconds = time.perf_counter() - start
    phases["forward_backward"] = peak_mib()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    optimizer.step()  # AdamW state: two fp32 copies of every parameter
    phases["optimizer_step"] = peak_mib()
    return {"peak_mib": peak_mib(), "phases_peak_mib": phases, "parameters": sum(p.numel() for p in model.parameters()),
            "loss": float(loss), "grad_norm": float(grad_norm), "forward_backward_seconds": seconds,
            "gradient_checkpointing": gradient_checkpointing}


def measure_scoring(preset_name: str, captions: int, images: int, pair_batch_size: int) -> dict:
    from interbert.config import preset
    from interbert.modeling import InterBertForImageTextRetrieval
    from interbert.retrieval import RegionInput, score_pairs

    config = preset(preset_name)
    batch = pretraining_batch(config, max(captions, images), seed=0)
    caption_ids = [batch["input_ids"][i, batch["attention_mask"][i].bool()].tolist() for i in range(captions)]
    regions = [
        RegionInput(batch["region_features"][i, batch["region_mask"][i].bool()], batch["region_boxes"][i, batch["region_mask"][i].bool()])
        for i in range(images)
    ]
    del batch
    phases = {"imports_and_inputs": peak_mib()}
    model = InterBertForImageTextRetrieval(config).eval()
    phases["model_built"] = peak_mib()
    report = score_pairs(model, caption_ids, regions, pair_batch_size=pair_batch_size, progress=False)
    phases["scoring"] = peak_mib()
    return {"peak_mib": peak_mib(), "phases_peak_mib": phases, "pairs": report.pair_forwards, "seconds": report.seconds,
            "pairs_per_s": report.pair_forwards / report.seconds}


def run_child(kind: str, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON."""
    code = (
        f"import json, sys, torch; sys.path.insert(0, {str(HERE)!r}); torch.set_num_threads(1); import memory; "
        f"print('RESULT' + json.dumps(memory.measure_{kind}(**{kwargs!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pair-batch-size", type=int, default=64)
    parser.add_argument("--captions", type=int, default=8)
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    payload = {"machine": machine_info()}
    payload["baseline_interpreter"] = run_child("train", preset_name="tiny", batch_size=1)
    payload["train_base"] = run_child("train", preset_name="base", batch_size=args.batch_size)
    print("train", payload["train_base"]["peak_mib"], flush=True)
    payload["train_base_checkpointed"] = run_child("train", preset_name="base", batch_size=args.batch_size,
                                                   gradient_checkpointing=True)
    print("train, gradient checkpointing", payload["train_base_checkpointed"]["peak_mib"], flush=True)
    payload["scoring_base"] = run_child("scoring", preset_name="base", captions=args.captions, images=args.images,
                                        pair_batch_size=args.pair_batch_size)
    print("scoring", payload["scoring_base"]["peak_mib"], flush=True)
    payload["load_average_at_end"] = load_average()
    payload["settings"] = vars(args)

    t, g, s = payload["train_base"], payload["train_base_checkpointed"], payload["scoring_base"]
    loss_diff, norm_diff = abs(t["loss"] - g["loss"]), abs(t["grad_norm"] - g["grad_norm"])
    payload["checkpointing_equal"] = {"loss_abs_diff": loss_diff, "grad_norm_abs_diff": norm_diff,
                                      "within_1e-5": loss_diff <= 1e-5 and norm_diff <= 1e-5 * max(1.0, t["grad_norm"])}

    def activations(run: dict) -> float:  # what the forward + backward added on top of weights and batch
        return run["phases_peak_mib"]["forward_backward"] - run["phases_peak_mib"]["model_built"]

    train_setting = f"batch {args.batch_size}, <=36 tokens, <=36+1 regions"
    md = "\n\n".join([
        "# Peak memory (RSS)",
        machine_markdown(payload["machine"]) + f" 1-min load average at the end: {payload['load_average_at_end']:.2f}.",
        "Each row is a fresh subprocess (1 torch thread); ru_maxrss is the peak resident set up to the end of each "
        "phase. Memory does not depend on the machine's load; the seconds do"
        + (" (this run started on a busy machine)." if payload["machine"]["load_average_at_start"] > 1.0 else "."),
        table(["measurement", "setting", "peak RSS MiB", "fwd+bwd adds MiB", "fwd+bwd s", "phases (peak MiB so far)"], [
            ["`base` pretraining step (MSM+MRM+ITM, fwd+bwd+AdamW)", train_setting, t["peak_mib"], activations(t),
             t["forward_backward_seconds"], ", ".join(f"{k} {v:.0f}" for k, v in t["phases_peak_mib"].items())],
            ["the same with `train.gradient_checkpointing=true`", train_setting, g["peak_mib"], activations(g),
             g["forward_backward_seconds"], ", ".join(f"{k} {v:.0f}" for k, v in g["phases_peak_mib"].items())],
            ["`base` full-protocol pair scoring (`retrieval.score_pairs`, no_grad)",
             f"{args.captions} captions x {args.images} images, pair batch {args.pair_batch_size}",
             s["peak_mib"], "", s["seconds"], ", ".join(f"{k} {v:.0f}" for k, v in s["phases_peak_mib"].items())],
            ["python + torch + tiny model (reference)", "", payload["baseline_interpreter"]["phases_peak_mib"]["imports_and_batch"],
             "", "", ""],
        ]),
        f"Gradient checkpointing, same weights, batch and dropout seed: loss {t['loss']:.6f} vs {g['loss']:.6f} "
        f"(|diff| {loss_diff:.1e}), gradient norm {t['grad_norm']:.6f} vs {g['grad_norm']:.6f} (|diff| {norm_diff:.1e}). "
        f"It cuts what the forward + backward adds from {activations(t):.0f} to {activations(g):.0f} MiB "
        f"({1 - activations(g) / activations(t):.0%} less) for {g['forward_backward_seconds'] / t['forward_backward_seconds']:.2f}x "
        "the fwd+bwd time (one run each, in fresh processes: a rough ratio). "
        f"Peak of the whole step: {t['peak_mib']:.0f} -> {g['peak_mib']:.0f} MiB"
        + (" (with checkpointing the peak is reached in the optimizer step, AdamW's state, not in the activations)."
           if g["phases_peak_mib"]["optimizer_step"] > g["phases_peak_mib"]["forward_backward"] + 1 else "."),
        f"`base` has {t['parameters'] / 1e6:.1f}M parameters ({t['parameters'] * 4 / 2**20:.0f} MiB fp32); AdamW adds two "
        "more fp32 copies and the gradients a third.",
    ])
    print("wrote", *write_results("memory", payload, md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
