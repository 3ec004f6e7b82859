"""Peak resident memory (ru_maxrss) of a `base` pretraining step and of retrieval-style pair scoring,
each measured in a fresh subprocess so that one number does not include the other's peak.

    python benchmarks/memory.py                         # train batch 32, scoring 64 pairs per batch
    python benchmarks/memory.py --pair-batch-size 512

Writes benchmarks/results/memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, machine_markdown, pretraining_batch, table, write_results  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_train(preset_name: str, batch_size: int) -> dict:
    from interbert.config import preset
    from interbert.modeling import InterBertForPreTraining

    config = preset(preset_name)
    batch = pretraining_batch(config, batch_size, seed=0)
    phases = {"imports_and_batch": peak_mib()}
    model = InterBertForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    phases["model_built"] = peak_mib()
    model(**batch).loss.backward()
    phases["forward_backward"] = peak_mib()
    optimizer.step()  # AdamW state: two fp32 copies of every parameter
    phases["optimizer_step"] = peak_mib()
    return {"peak_mib": peak_mib(), "phases_peak_mib": phases, "parameters": sum(p.numel() for p in model.parameters())}


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
        f"import json, sys, torch; sys.path.insert(0, {str(HERE)!r}); torch.set_num_threads(2); import memory; "
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
    torch.set_num_threads(2)

    payload = {"machine": machine_info()}
    payload["baseline_interpreter"] = run_child("train", preset_name="tiny", batch_size=1)
    payload["train_base"] = run_child("train", preset_name="base", batch_size=args.batch_size)
    print("train", payload["train_base"]["peak_mib"], flush=True)
    payload["scoring_base"] = run_child("scoring", preset_name="base", captions=args.captions, images=args.images,
                                        pair_batch_size=args.pair_batch_size)
    print("scoring", payload["scoring_base"]["peak_mib"], flush=True)
    payload["settings"] = vars(args)

    t, s = payload["train_base"], payload["scoring_base"]
    md = "\n\n".join([
        "# Peak memory (RSS)",
        machine_markdown(payload["machine"]),
        "Each row is a fresh subprocess; ru_maxrss is the peak resident set up to the end of each phase.",
        table(["measurement", "setting", "peak RSS MiB", "phases (peak MiB so far)"], [
            ["`base` pretraining step (MSM+MRM+ITM, fwd+bwd+AdamW)", f"batch {args.batch_size}, <=36 tokens, <=36+1 regions",
             t["peak_mib"], ", ".join(f"{k} {v:.0f}" for k, v in t["phases_peak_mib"].items())],
            ["`base` full-protocol pair scoring (`retrieval.score_pairs`, no_grad)",
             f"{args.captions} captions x {args.images} images, pair batch {args.pair_batch_size}",
             s["peak_mib"], ", ".join(f"{k} {v:.0f}" for k, v in s["phases_peak_mib"].items())],
            ["python + torch + tiny model (reference)", "", payload["baseline_interpreter"]["phases_peak_mib"]["imports_and_batch"], ""],
        ]),
        f"`base` has {t['parameters'] / 1e6:.1f}M parameters ({t['parameters'] * 4 / 2**20:.0f} MiB fp32); AdamW adds two "
        "more fp32 copies and the gradients a third.",
    ])
    print("wrote", *write_results("memory", payload, md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
