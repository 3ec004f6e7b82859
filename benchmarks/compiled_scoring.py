"""Eager vs static-shape vs torch.compile'd pair scoring (issue 26): the full protocol and the service's re-rank.

    python benchmarks/compiled_scoring.py                                   # tiny and base, idle machine
    python benchmarks/compiled_scoring.py --presets tiny --captions 16 --images 8 --repeats 1 --no-write  # smoke

Three sides of the same work, timed alternately:

- ``eager``: today's path (``retrieval.score_pairs`` as ``evaluate retrieval`` runs it; the re-rank as
  ``serve`` runs it): real positions packed, each batch padded to its own longest;
- ``static``: pair batches padded to buckets (rows, tokens, regions) in the static-shape mode
  (``score_pairs(static_shapes=True)``), not compiled: the price of the padding and the dense layout alone;
- ``compiled``: the same through ``torch.compile(dynamic=False)`` (``evaluate retrieval --compile default``,
  ``serve --compile default``).

Full protocol: every caption of a sample against every image (5 captions per image), pairs/s per side. The
compile time is the first compiled run (dynamo's cache reset, inductor's caches in a fresh folder, so every
bucket shape compiles from scratch, as on a fresh machine) less a compiled run's time; the end-to-end figure of a ``--gallery`` images evaluation (5 captions each, every pair) includes it.
Re-rank: one query against ``--candidates`` first-stage candidates in the service's 64-pair chunks, ms per query;
its compile time is that of the shapes these candidates meet. Each side's largest score difference from eager is
recorded. Writes benchmarks/results/compiled_scoring{_TAG}.json and .md; refuses a busy machine (load rule of
common.py) unless --force.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    check_start_load,
    load_markdown,
    machine_info,
    machine_markdown,
    median,
    table,
    time_alternating,
    write_results,
)
from eval_cost import CAPTIONS_PER_IMAGE, inputs  # noqa: E402

from interbert.config import preset  # noqa: E402
from interbert.modeling import InterBertForImageTextRetrieval  # noqa: E402
from interbert.retrieval import _embed_images, _pad, pair_scorer, score_pairs  # noqa: E402
from interbert.serve.service import RERANK_BATCH  # noqa: E402
from interbert.static_scoring import StaticPairScorer, doubling_edges  # noqa: E402

SIDES = {"eager": {}, "static": {"static_shapes": True}, "compiled": {"compile": "default"}}
# (captions, images) of the full-protocol sample. At tiny, 1,040 captions make 3 length-sorted blocks of 512 and
# each of the 8 images its own batch, so the run meets the (tokens, regions) buckets a real split does and the
# compile time counts their graphs; base's sample is small (CPU), one or two graphs.
SAMPLES = {"tiny": (1040, 8), "base": (40, 4)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiling(warm_cache: bool):
    """dynamo's cache reset and, unless ``warm_cache``, inductor's caches in a fresh folder: every shape compiles
    from scratch, as on a fresh machine (from an earlier run's cached graphs it takes a fraction of that)."""
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    return contextlib.nullcontext() if warm_cache else fresh_cache()


def full_protocol(model, ids, regions, pair_batch_size: int, repeats: int, gallery: int, mode: str,
                  warm_cache: bool = False) -> dict:
    """pairs/s of each side on the same captions x images, compile time, end-to-end seconds at ``gallery``."""
    device = next(model.parameters()).device
    sides = {**SIDES, "compiled": {"compile": mode}}

    def run(side: str):
        return score_pairs(model, ids, regions, pair_batch_size=pair_batch_size, progress=False, **sides[side])

    reference = run("eager")
    with compiling(warm_cache):  # every bucket shape compiles in the timed first run
        start = time.perf_counter()
        first = run("compiled")
        synchronize(device)
        first_s = time.perf_counter() - start
    differences = {side: float(np.abs(run(side).scores - reference.scores).max()) for side in ("static", "compiled")}
    times = time_alternating({side: (lambda _, side=side: run(side)) for side in sides}, warmup=0, iterations=repeats)
    seconds = {side: median(v) for side, v in times.items()}
    pairs = reference.pair_forwards
    compile_s = max(0.0, first_s - seconds["compiled"])
    gallery_pairs = CAPTIONS_PER_IMAGE * gallery * gallery
    rate = {side: pairs / s for side, s in seconds.items()}
    return {
        "captions": len(ids), "images": len(regions), "pairs": pairs, "pair_batch_size": pair_batch_size,
        "shapes": first.shapes, "seconds": times, "pairs_per_s": rate, "compile_seconds": compile_s,
        "max_abs_difference_from_eager": differences,
        "gallery": gallery, "gallery_pairs": gallery_pairs,
        "gallery_seconds": {side: gallery_pairs / r + (compile_s if side == "compiled" else 0.0) for side, r in rate.items()},
    }


def rerank(model, ids, regions, candidates: int, repeats: int, mode: str, warm_cache: bool = False) -> dict:
    """ms per query of the service's re-rank of ``candidates`` images (64-pair chunks), each side."""
    device = next(model.parameters()).device
    head = pair_scorer(model)
    embedded = _embed_images(model, regions)
    query = model.interbert.embeddings(torch.as_tensor([ids[0]], device=device), None)
    chunks = []
    for start in range(0, candidates, RERANK_BATCH):
        images, keep = _pad([embedded[i % len(embedded)] for i in range(start, min(candidates, start + RERANK_BATCH))])
        n = images.shape[0]
        chunks.append((query.expand(n, -1, -1), torch.ones(n, query.shape[1], dtype=torch.bool, device=device), images, keep))
    edges = dict(row_edges=doubling_edges(RERANK_BATCH), text_edges=doubling_edges(64),
                 region_edges=doubling_edges(max(len(r.boxes) for r in regions)))
    scorers = {"static": StaticPairScorer(model.interbert, head, **edges),
               "compiled": StaticPairScorer(model.interbert, head, compile=mode, **edges)}

    def eager(text, text_keep, image, image_keep):
        out = model.interbert.encode(text, text_keep, image, image_keep)
        return head(out.text_pooled, out.image_pooled)

    scorers["eager"] = eager

    @torch.inference_mode()
    def query_scores(side: str) -> np.ndarray:
        scores = np.concatenate([scorers[side](*chunk).float().cpu().numpy() for chunk in chunks])
        synchronize(device)
        return scores

    reference = query_scores("eager")
    with compiling(warm_cache):
        start = time.perf_counter()
        query_scores("compiled")
        first_s = time.perf_counter() - start
    differences = {side: float(np.abs(query_scores(side) - reference).max()) for side in ("static", "compiled")}
    times = time_alternating({side: (lambda _, side=side: query_scores(side)) for side in ("eager", "static", "compiled")},
                             warmup=1, iterations=repeats)
    ms = {side: 1000 * median(v) for side, v in times.items()}
    return {"candidates": candidates, "shapes": len(scorers["compiled"].shapes), "ms_per_query": ms,
            "compile_seconds": max(0.0, first_s - ms["compiled"] / 1000), "max_abs_difference_from_eager": differences}


def bench_preset(name: str, args, device: torch.device) -> dict:
    config = preset(name)
    torch.manual_seed(0)
    model = InterBertForImageTextRetrieval(config).eval().to(device)
    captions, images = (args.captions, args.images) if args.captions else SAMPLES[name]
    ids, regions = inputs(config, captions, images)
    regions = [type(r)(torch.as_tensor(r.features, device=device), torch.as_tensor(r.boxes, device=device)) for r in regions]
    return {"preset": name, "full_protocol": full_protocol(model, ids, regions, args.pair_batch_size, args.repeats,
                                                           args.gallery, args.mode, args.warm_cache),
            "rerank": rerank(model, ids, regions, args.candidates, args.repeats, args.mode, args.warm_cache)}


def markdown(payload: dict) -> str:
    g = payload["gallery"]
    full = [[r["preset"], f"{f['captions']} x {f['images']}", f["shapes"], f["pairs_per_s"]["eager"],
             f["pairs_per_s"]["static"], f["pairs_per_s"]["compiled"], f["pairs_per_s"]["compiled"] / f["pairs_per_s"]["eager"],
             f["compile_seconds"], f["gallery_seconds"]["eager"], f["gallery_seconds"]["compiled"],
             f"{f['max_abs_difference_from_eager']['compiled']:.1e}"]
            for r in payload["presets"] for f in [r["full_protocol"]]]
    rerank_rows = [[r["preset"], q["candidates"], q["shapes"], q["ms_per_query"]["eager"], q["ms_per_query"]["static"],
                    q["ms_per_query"]["compiled"], q["ms_per_query"]["eager"] / q["ms_per_query"]["compiled"],
                    q["compile_seconds"], f"{q['max_abs_difference_from_eager']['compiled']:.1e}"]
                   for r in payload["presets"] for q in [r["rerank"]]]
    return "\n\n".join([
        "# Compiled pair scoring (issue 26)",
        f"Retrieval scorer (`InterBertForImageTextRetrieval`, untrained), torch.compile mode `{payload['mode']}`, "
        f"on {payload['device']}; sides timed alternately, median of {payload['repeats']} runs. Static: pair batches "
        "padded to buckets in the static-shape mode, eager; compiled: the same through torch.compile. Compile time: "
        "the first compiled run (dynamo's cache reset" + ("" if payload.get("warm_cache") else ", inductor's caches "
        "fresh: from scratch, as on a new machine") + ") less a compiled run.",
        "## Full protocol (`evaluate retrieval`)",
        table(["preset", "captions x images", "shapes", "eager pairs/s", "static pairs/s", "compiled pairs/s",
               "compiled / eager", "compile s", f"{g}-image eval s, eager", f"{g}-image eval s, compiled (incl. compile)",
               "max abs difference, compiled vs eager"], full),
        "## Re-rank (`serve`, one query, 64-pair chunks)",
        table(["preset", "candidates", "shapes", "eager ms", "static ms", "compiled ms", "compiled speedup",
               "compile s", "max abs difference, compiled vs eager"], rerank_rows),
        machine_markdown(payload["machine"]) + " " + load_markdown(payload["load"]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--captions", type=int, help="captions of the full-protocol sample (default: SAMPLES)")
    parser.add_argument("--images", type=int, help="images of the sample (default: SAMPLES)")
    parser.add_argument("--pair-batch-size", type=int, default=512)
    parser.add_argument("--candidates", type=int, default=200, help="re-rank depth (serve's cap: 200)")
    parser.add_argument("--gallery", type=int, default=1000, help="images of the end-to-end figure (5 captions each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    parser.add_argument("--mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode (the last two on CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warm-cache", action="store_true",
                        help="let inductor reuse graphs an earlier run compiled (default: compile from scratch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--force", action="store_true", help="run on a busy machine (results marked loaded)")
    parser.add_argument("--no-write", action="store_true", help="print only (a smoke run)")
    args = parser.parse_args(argv)
    if bool(args.captions) != bool(args.images):
        parser.error("give --captions and --images together")
    load = check_start_load(args.force or args.no_write)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    payload = {"machine": machine_info(load["load_average_at_start"]), "load": load, "device": str(device),
               "mode": args.mode, "repeats": args.repeats, "warm_cache": args.warm_cache, "gallery": args.gallery, "presets": []}
    with torch.no_grad():
        for name in args.presets:
            result = bench_preset(name, args, device)
            payload["presets"].append(result)
            f, q = result["full_protocol"], result["rerank"]
            rate = f["pairs_per_s"]
            print(f"{name} full protocol {f['captions']} x {f['images']}: eager {rate['eager']:.0f} pairs/s, static "
                  f"{rate['static']:.0f}, compiled {rate['compiled']:.0f} ({f['shapes']} shapes, compile "
                  f"{f['compile_seconds']:.1f} s, max diff {f['max_abs_difference_from_eager']['compiled']:.1e})", flush=True)
            ms = q["ms_per_query"]
            print(f"{name} re-rank of {q['candidates']}: eager {ms['eager']:.1f} ms, static {ms['static']:.1f}, compiled "
                  f"{ms['compiled']:.1f} ({q['shapes']} shapes, compile {q['compile_seconds']:.1f} s)", flush=True)
    load["load_average_at_end"] = os.getloadavg()[0]
    if args.no_write:
        print(markdown(payload))
        return 0
    name = "compiled_scoring" + (f"_{args.tag}" if args.tag else "")
    print("wrote", *write_results(name, payload, markdown(payload)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
