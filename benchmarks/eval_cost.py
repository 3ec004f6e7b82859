"""Retrieval evaluation cost: pairs/s of the full protocol (`retrieval.score_pairs`) at `tiny` and
`base`, and how the full protocol's cost grows with the gallery (100, 300, 1,000 images, 5 captions
each) against the two-stage variant (`retrieval.two_stage_scores`, top-K re-ranked).

    python benchmarks/eval_cost.py

On 2 CPU cores a 1,000-image full protocol (5M pair forwards) takes days, so the gallery-size curve
is projected from rates measured here: full = 5N x N pairs / pairs-per-s; two-stage = 5N text
passes + N image passes at their measured rates + 5N x K pairs. A small gallery is run end to end
with both methods to check the projection. Writes benchmarks/results/eval_cost.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import check_start_load, machine_info, machine_markdown, pretraining_batch, table, write_results  # noqa: E402

from interbert.config import preset  # noqa: E402
from interbert.modeling import InterBertForImageTextRetrieval  # noqa: E402
from interbert.retrieval import RegionInput, embedding_similarity, score_pairs, two_stage_scores  # noqa: E402

GALLERIES = (100, 300, 1000)
CAPTIONS_PER_IMAGE = 5


def inputs(config, captions: int, images: int, seed: int = 0):
    batch = pretraining_batch(config, max(captions, images), seed=seed)
    ids = [batch["input_ids"][i, batch["attention_mask"][i].bool()].tolist() for i in range(captions)]
    keep = batch["region_mask"].bool()
    regions = [RegionInput(batch["region_features"][i, keep[i]], batch["region_boxes"][i, keep[i]]) for i in range(images)]
    return ids, regions


def rates(name: str, captions: int, images: int) -> dict:
    config = preset(name)
    torch.manual_seed(0)
    model = InterBertForImageTextRetrieval(config).eval()
    ids, regions = inputs(config, captions, images)
    score_pairs(model, ids[:2], regions[:2], progress=False)  # warm-up
    full = score_pairs(model, ids, regions, progress=False)
    start = time.perf_counter()
    embedding_similarity(model, ids, regions)
    single_modal_s = time.perf_counter() - start
    return {
        "preset": name, "captions": captions, "images": images,
        "pairs": full.pair_forwards, "pairs_seconds": full.seconds, "pairs_per_s": full.pair_forwards / full.seconds,
        # one text pass per caption + one image pass per image, timed together
        "single_modal_passes_per_s": (captions + images) / single_modal_s,
    }


def projected(r: dict, gallery: int, k: int) -> dict:
    n_captions = CAPTIONS_PER_IMAGE * gallery
    full_s = n_captions * gallery / r["pairs_per_s"]
    two_stage_s = (n_captions + gallery) / r["single_modal_passes_per_s"] + n_captions * min(k, gallery) / r["pairs_per_s"]
    return {"gallery": gallery, "captions": n_captions, "full_pairs": n_captions * gallery, "full_s": full_s,
            "two_stage_pairs": n_captions * min(k, gallery), "two_stage_s": two_stage_s, "ratio": full_s / two_stage_s}


def end_to_end(name: str, gallery: int, captions: int, k: int) -> dict:
    config = preset(name)
    torch.manual_seed(0)
    model = InterBertForImageTextRetrieval(config).eval()
    ids, regions = inputs(config, captions, gallery, seed=2)
    full = score_pairs(model, ids, regions, progress=False)
    two = two_stage_scores(model, ids, regions, k=k, progress=False)
    return {"preset": name, "gallery": gallery, "captions": captions, "k": k, "full_s": full.seconds,
            "full_pairs": full.pair_forwards, "two_stage_s": two.seconds, "two_stage_pairs": two.pair_forwards}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=20, help="two-stage candidates re-ranked per caption")
    parser.add_argument("--force", action="store_true", help="run on a busy machine (results marked loaded)")
    args = parser.parse_args(argv)
    load = check_start_load(args.force)
    torch.set_num_threads(2)
    payload = {"machine": machine_info(), "load": load, "k": args.k, "rates": [], "projection": {}}
    for name, (c, i) in {"tiny": (32, 32), "base": (4, 8)}.items():
        r = rates(name, c, i)
        payload["rates"].append(r)
        payload["projection"][name] = [projected(r, g, args.k) for g in GALLERIES]
        print(f"{name}: {r['pairs_per_s']:.1f} pairs/s, {r['single_modal_passes_per_s']:.1f} single-modal passes/s", flush=True)
    payload["end_to_end"] = end_to_end("tiny", gallery=40, captions=40, k=args.k)
    e = payload["end_to_end"]
    rt = payload["rates"][0]
    e["full_predicted_s"] = e["full_pairs"] / rt["pairs_per_s"]
    e["two_stage_predicted_s"] = (e["captions"] + e["gallery"]) / rt["single_modal_passes_per_s"] + e["two_stage_pairs"] / rt["pairs_per_s"]
    payload["load_average_at_end"] = load["load_average_at_end"] = __import__("os").getloadavg()[0]

    hours = lambda s: f"{s / 3600:.2f} h" if s >= 3600 else f"{s:.0f} s"  # noqa: E731
    md = [
        "# Retrieval evaluation cost",
        machine_markdown(payload["machine"]),
        "Full protocol = `retrieval.score_pairs` over every caption x image pair (each image's region embeddings "
        "and each caption's token embeddings computed once, captions sorted by length, 512 pairs per batch). "
        f"Two-stage = `retrieval.two_stage_scores`: single-modal embeddings, then the top {args.k} images per "
        "caption re-scored by the cross-encoder.",
        "## Measured rates",
        table(["preset", "sample (captions x images)", "pairs/s (full protocol)", "single-modal passes/s"],
              [[r["preset"], f"{r['captions']} x {r['images']}", r["pairs_per_s"], r["single_modal_passes_per_s"]] for r in payload["rates"]]),
        f"## Projected cost vs gallery size ({CAPTIONS_PER_IMAGE} captions per image, this machine)",
        table(["preset", "gallery", "full: pairs", "full: time", f"two-stage K={args.k}: pairs", "two-stage: time", "full / two-stage"],
              [[name, p["gallery"], p["full_pairs"], hours(p["full_s"]), p["two_stage_pairs"], hours(p["two_stage_s"]), p["ratio"]]
               for name, ps in payload["projection"].items() for p in ps]),
        "The full protocol grows with the square of the gallery (captions and images both grow), the two-stage "
        "variant linearly.",
        "## End-to-end check (tiny)",
        table(["gallery x captions", "full s (predicted)", "two-stage s (predicted)"],
              [[f"{e['gallery']} x {e['captions']}", f"{e['full_s']:.1f} ({e['full_predicted_s']:.1f})",
                f"{e['two_stage_s']:.1f} ({e['two_stage_predicted_s']:.1f})"]]),
    ]
    print("wrote", *write_results("eval_cost", payload, "\n\n".join(md)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
