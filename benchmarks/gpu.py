"""One-GPU benchmark (H100/H200, well under 10 minutes): the `base` pretraining step under bf16
autocast and full-protocol pair scoring, with MFU against the card's dense bf16 peak.

    python benchmarks/gpu.py                 # on the GPU machine
    python benchmarks/gpu.py --dry-run       # CPU, tiny preset, a few steps: checks the code paths

Pair scoring follows the full protocol's structure (retrieval.score_pairs): every caption's token
embeddings and every image's region embeddings are computed once, then (caption, image) pairs run
through the interaction layers (`InterBertModel.encode`) in large batches of length-sorted captions.
Writes benchmarks/results/gpu.json and .md (gpu_dry_run.* for --dry-run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, machine_info, median, pretraining_batch, table, write_results  # noqa: E402

from interbert.config import preset  # noqa: E402
from interbert.modeling import InterBertForImageTextRetrieval, InterBertForPreTraining, fuse  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets.
BF16_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0}


def bf16_peak(device_name: str) -> float | None:
    name = device_name.upper()
    if "H200" in name:
        return BF16_PEAK_TFLOPS["H200"]
    if "H100" in name:
        return BF16_PEAK_TFLOPS["H100 PCIe" if "PCIE" in name else "H100 NVL" if "NVL" in name else "H100 SXM"]
    if "A100" in name:
        return BF16_PEAK_TFLOPS["A100"]
    return None


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, iterations: int) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def bench_train(name: str, batch_size: int, device: torch.device, warmup: int, iterations: int) -> dict:
    config = preset(name)
    torch.manual_seed(0)
    model = InterBertForPreTraining(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batches = [to_device(pretraining_batch(config, batch_size, seed=s), device) for s in range(4)]
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = sum(count_flops(lambda b=b: model(**b).loss.backward()) for b in batches) / len(batches)
    optimizer.zero_grad(set_to_none=True)
    times = timed(step, device, warmup, iterations)
    seconds = median(times)
    return {"preset": name, "batch_size": batch_size, "iterations": iterations, "seconds_per_step": seconds,
            "examples_per_s": batch_size / seconds, "flop_per_step": flops, "achieved_tflops": flops / seconds / 1e12}


@torch.no_grad()
def bench_scoring(name: str, captions: int, images: int, pair_batch: int, device: torch.device, iterations: int) -> dict:
    config = preset(name)
    torch.manual_seed(0)
    model = InterBertForImageTextRetrieval(config).to(device).eval()
    base = model.interbert
    data = to_device(pretraining_batch(config, max(captions, images), seed=1), device)
    # each caption and each image embedded once, captions sorted by length
    order = data["attention_mask"][:captions].sum(1).argsort()
    text = base.embeddings(data["input_ids"][:captions][order], None)
    text_keep = data["attention_mask"][:captions][order].bool()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        image = base.region_embeddings(data["region_features"][:images], data["region_boxes"][:images])
    image_keep = data["region_mask"][:images].bool()
    captions_per_batch = max(1, pair_batch // images) if pair_batch >= images else 1
    images_per_batch = images if pair_batch >= images else pair_batch

    def score_all() -> torch.Tensor:
        scores = torch.empty(captions, images, device=device)
        for c0 in range(0, captions, captions_per_batch):
            c = slice(c0, min(captions, c0 + captions_per_batch))
            t_len = int(text_keep[c].sum(1).max())  # drop padding common to the length-sorted run
            for i0 in range(0, images, images_per_batch):
                i = slice(i0, min(images, i0 + images_per_batch))
                nc, ni = c.stop - c.start, i.stop - i.start
                t = text[c, :t_len].repeat_interleave(ni, 0)
                tk = text_keep[c, :t_len].repeat_interleave(ni, 0)
                v, vk = image[i].repeat(nc, 1, 1), image_keep[i].repeat(nc, 1)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = base.encode(t, tk, v, vk)
                    s = model.score(fuse(out.text_pooled, out.image_pooled, config.fusion)).squeeze(-1)
                scores[c, i] = s.float().view(nc, ni)
        return scores

    pairs = captions * images
    flops = count_flops(score_all)
    times = timed(score_all, device, warmup=1, iterations=iterations)
    seconds = median(times)
    full = 5000 * 1000
    return {"preset": name, "captions": captions, "images": images, "pair_batch": captions_per_batch * images_per_batch,
            "pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds, "flop": flops,
            "achieved_tflops": flops / seconds / 1e12, "projected_full_protocol_5000x1000_s": full / (pairs / seconds)}


def check_score_pairs_on_device(device: torch.device) -> dict:
    """The library's own evaluation path (retrieval.score_pairs, fp32) on the device agrees with the CPU."""
    import numpy as np

    from interbert.retrieval import RegionInput, score_pairs

    torch.manual_seed(0)
    model = InterBertForImageTextRetrieval(preset("tiny", region_feature_size=64, num_region_classes=10)).eval()
    rng = np.random.default_rng(0)
    captions = [[101, *rng.integers(1000, 2000, size=n).tolist(), 102] for n in (5, 9, 7, 12)]
    images = [RegionInput(rng.normal(size=(r, 64)).astype(np.float32), rng.uniform(0, 1, size=(r, 5)).astype(np.float32))
              for r in (10, 4, 7)]
    on_cpu = score_pairs(model, captions, images, pair_batch_size=5, progress=False).scores
    on_device = score_pairs(model.to(device), captions, images, pair_batch_size=5, progress=False).scores
    return {"max_abs_diff_vs_cpu": float(np.abs(on_cpu - on_device).max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, minimal sizes")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--captions", type=int, default=1000)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--pair-batch", type=int, default=1000)
    parser.add_argument("--peak-tflops", type=float, help="override the card's dense bf16 peak")
    args = parser.parse_args(argv)

    if args.dry_run:
        device, name = torch.device("cpu"), "tiny"
        args.batch_size, args.iterations, args.captions, args.images, args.pair_batch = 4, 1, 6, 4, 8
        torch.set_num_threads(2)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --dry-run to check the script on CPU")
        device, name = torch.device("cuda"), "base"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)"
    peak = args.peak_tflops or bf16_peak(device_name)

    started = time.perf_counter()
    parity = check_score_pairs_on_device(device)
    print(f"score_pairs on {device}: max |diff| vs CPU {parity['max_abs_diff_vs_cpu']:.2e}", flush=True)
    train = bench_train(name, args.batch_size, device, warmup=min(5, args.iterations), iterations=args.iterations)
    print(f"train: {train['examples_per_s']:.1f} examples/s, {train['achieved_tflops']:.1f} TFLOP/s", flush=True)
    scoring = bench_scoring(name, args.captions, args.images, args.pair_batch, device, iterations=min(3, args.iterations))
    print(f"scoring: {scoring['pairs_per_s']:.0f} pairs/s, {scoring['achieved_tflops']:.1f} TFLOP/s", flush=True)
    for r in (train, scoring):
        r["mfu"] = r["achieved_tflops"] / peak if peak else None

    payload = {"machine": machine_info(), "device": device_name, "bf16_peak_tflops": peak, "dry_run": args.dry_run,
               "score_pairs_parity": parity, "train": train, "scoring": scoring, "wall_s": time.perf_counter() - started}
    if device.type == "cuda":
        payload["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    mfu = lambda r: f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"  # noqa: E731
    md = "\n\n".join([
        f"# GPU benchmark{' (dry run on CPU: checks the code paths, numbers mean nothing)' if args.dry_run else ''}",
        f"Device: {device_name}; bf16 dense peak {peak} TFLOP/s; torch {torch.__version__}; {payload['machine']['date']}.",
        table(["measurement", "setting", "rate", "achieved TFLOP/s", "MFU"], [
            [f"`{name}` pretraining step, bf16 autocast, AdamW", f"batch {train['batch_size']}",
             f"{train['examples_per_s']:.1f} examples/s", train["achieved_tflops"], mfu(train)],
            [f"`{name}` full-protocol pair scoring, bf16", f"{scoring['captions']} x {scoring['images']}, {scoring['pair_batch']} pairs/batch",
             f"{scoring['pairs_per_s']:.0f} pairs/s", scoring["achieved_tflops"], mfu(scoring)],
        ]),
        f"Projected 5,000 x 1,000 full protocol: {scoring['projected_full_protocol_5000x1000_s']:.0f} s. Wall time {payload['wall_s']:.0f} s.",
        f"`interbert evaluate retrieval --device` path (`retrieval.score_pairs`, fp32, `tiny`) on {device}: largest "
        f"difference from the CPU scores {parity['max_abs_diff_vs_cpu']:.2e}.",
    ])
    print("wrote", *write_results("gpu_dry_run" if args.dry_run else "gpu", payload, md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
