"""Shared pieces of the benchmark scripts: machine description, timing, the fp32 matmul peak, aten op counts,
realistic pretraining batches, the VisualBERT peer, and writing results (JSON + markdown).

Every comparison is a ratio measured inside one run, with the two sides timed alternately so that a
busy machine slows both sides alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from interbert.config import InterBertConfig
from interbert.utils.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
CLS_ID, SEP_ID, MASK_ID = 101, 102, 103


# --------------------------------------------------------------------------------------------------
# Machine and results
# --------------------------------------------------------------------------------------------------
def machine_info(load_at_start: float | None = None) -> dict:
    """The machine, torch's threads and versions; ``load_at_start``: the 1-min load average the run started at
    (check_start_load's), for a caller that writes this at the end of its run. Without it, the load now."""
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "load_average_at_start": load_at_start if load_at_start is not None else (
            os.getloadavg()[0] if hasattr(os, "getloadavg") else None),
    }


MAX_START_LOAD = 1.0  # a run that starts on a busier machine measures the other jobs too


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def check_start_load(force: bool, limit: float = MAX_START_LOAD) -> dict:
    """Refuse (SystemExit) to start a timed run when the 1-minute load average is above ``limit``, unless
    ``force``: then the run goes on and its results say they were measured on a loaded machine."""
    load = load_average()
    loaded = load is not None and load > limit
    if loaded and not force:
        raise SystemExit(f"1-minute load average {load:.2f} > {limit}: the machine is busy, timings would measure "
                         "other jobs too. Wait for an idle machine, or pass --force to run anyway (results marked loaded).")
    return {"load_average_at_start": load, "load_limit": limit, "loaded": loaded}


def load_markdown(load: dict) -> str:
    end = load.get("load_average_at_end")
    text = f"1-min load average {load['load_average_at_start']:.2f} at start"
    text += f", {end:.2f} at end." if end is not None else "."
    if load.get("loaded"):
        text += f" **Measured on a loaded machine (start load above {load['load_limit']}): ratios only, absolute times are not representative.**"
    elif end is not None and end > load.get("load_limit", 1.0):
        text += (" The machine was idle when the run started (below the limit, as the script requires); the higher "
                 "figure at the end is the benchmark's own load: its torch threads keep the cores busy for minutes, "
                 "so the 1-minute average climbs with nothing else running.")
    return text


def machine_markdown(info: dict) -> str:
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['cpu_capability']}), torch {info['torch']} "
        f"with {info['torch_threads']} threads, transformers {info['transformers']}, {info['date']} "
        f"(1-min load average {info['load_average_at_start']:.2f} at the start of the run)."
    )


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def time_alternating(fns: dict[str, Callable[[int], None]], warmup: int, iterations: int) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved (a, b, a, b, ...) so that load from other
    processes falls on every side alike. Each function receives the iteration index."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(iterations):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak_gflops(sizes: tuple[int, ...] = (2048, 4096), repeats: int = 5) -> dict:
    """The machine's attainable fp32 matmul rate: best median GFLOP/s of square torch.mm over sizes."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            torch.mm(a, b)
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - start)
        out[n] = 2 * n**3 / median(ts) / 1e9
    return {"gflops": max(out.values()), "by_size": out}


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call (matmuls, convolutions and attention, as torch's FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------------
# aten ops (torch.profiler, CPU activity)
# --------------------------------------------------------------------------------------------------
def profiler_table(prof) -> list[tuple[str, int, float]]:
    """(op, calls, self CPU microseconds) of every op a finished torch.profiler run recorded: plain values, so
    a child process can print them as JSON and the counting below runs in this tree whatever the child ran."""
    return [(event.key, event.count, event.self_cpu_time_total) for event in prof.key_averages()]


def aten_op_count(table: list[tuple[str, int, float]]) -> int:
    """Calls of ``aten::`` ops in ``table``, nested ones included (an op's own calls into others count too)."""
    return sum(calls for op, calls, _ in table if op.startswith("aten::"))


def top_aten_ops(table: list[tuple[str, int, float]], steps: int, n: int = 5) -> list[dict]:
    """The ``n`` aten ops with the most self CPU time, per step of the ``steps`` the table covers (rows of the
    same op, e.g. from several profiled runs, are added up first)."""
    totals: dict[str, list[float]] = {}
    for op, calls, self_us in table:
        if op.startswith("aten::"):
            total = totals.setdefault(op, [0, 0.0])
            total[0] += calls
            total[1] += self_us
    top = sorted(totals.items(), key=lambda item: item[1][1], reverse=True)[:n]
    return [{"op": op, "self_cpu_ms_per_step": self_us / 1e3 / steps, "calls_per_step": calls / steps}
            for op, (calls, self_us) in top]


def aten_ops_per_step(run: Callable[[int], None], steps: int = 2) -> float:
    """aten ops per call of ``run(i)`` (e.g. forward + backward), nested ones included, as torch.profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            run(i)
    return aten_op_count(profiler_table(prof)) / steps


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------
def pretraining_batch(
    config: InterBertConfig,
    batch_size: int,
    seed: int,
    max_tokens: int = 36,
    max_regions: int = 36,
    min_tokens: int = 8,
    min_regions: int = 10,
) -> dict[str, torch.Tensor]:
    """A pretraining batch shaped like real data after dynamic padding.

    Captions have 8..36 tokens ([CLS] and [SEP] included), images 10..36 regions plus the global one,
    padded to the batch's longest. Labels follow tests/model/test_modeling.py: one masked span of ~15% of
    each caption (MSM), ~10-15% of each image's regions zeroed and scored against a detector class
    distribution (MRM), half of the pairs mismatched (ITM).
    """
    g = torch.Generator().manual_seed(seed)
    text_lengths = torch.randint(min_tokens, max_tokens + 1, (batch_size,), generator=g)
    region_counts = torch.randint(min_regions, max_regions + 1, (batch_size,), generator=g) + 1  # + global
    t, r = int(text_lengths.max()), int(region_counts.max())

    input_ids = torch.zeros(batch_size, t, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, t, dtype=torch.long)
    msm_labels = torch.full((batch_size, t), -100, dtype=torch.long)
    region_features = torch.zeros(batch_size, r, config.region_feature_size)
    region_boxes = torch.zeros(batch_size, r, 5)
    region_mask = torch.zeros(batch_size, r, dtype=torch.long)
    mrm_mask = torch.zeros(batch_size, r, dtype=torch.bool)
    for i in range(batch_size):
        n_text, n_regions = int(text_lengths[i]), int(region_counts[i])
        words = torch.randint(1000, config.vocab_size, (n_text - 2,), generator=g)
        input_ids[i, :n_text] = torch.cat([torch.tensor([CLS_ID]), words, torch.tensor([SEP_ID])])
        attention_mask[i, :n_text] = 1
        span = max(1, round(0.15 * (n_text - 2)))
        start = 1 + int(torch.randint(0, n_text - 2 - span + 1, (1,), generator=g))
        msm_labels[i, start : start + span] = input_ids[i, start : start + span]
        input_ids[i, start : start + span] = MASK_ID

        feats = torch.rand(n_regions - 1, config.region_feature_size, generator=g)
        xy = torch.rand(n_regions - 1, 2, generator=g) * 0.5
        wh = torch.rand(n_regions - 1, 2, generator=g) * 0.5
        boxes = torch.cat([xy, xy + wh, (wh[:, :1] * wh[:, 1:])], dim=1)
        region_features[i, 0], region_features[i, 1:n_regions] = feats.mean(0), feats
        region_boxes[i, 0], region_boxes[i, 1:n_regions] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]), boxes
        region_mask[i, :n_regions] = 1
        fraction = 0.10 + 0.05 * float(torch.rand((), generator=g))
        n_masked = max(1, round(fraction * (n_regions - 1)))
        masked = 1 + torch.randperm(n_regions - 1, generator=g)[:n_masked]
        mrm_mask[i, masked] = True
        region_features[i, masked] = 0.0

    class_logits = torch.randn(batch_size, r, config.num_region_classes, generator=g)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=torch.zeros_like(input_ids),
        region_features=region_features,
        region_boxes=region_boxes,
        region_mask=region_mask,
        msm_labels=msm_labels,
        mrm_mask=mrm_mask,
        mrm_class_targets=torch.softmax(class_logits, dim=-1),
        itm_labels=torch.randint(0, 2, (batch_size,), generator=g),
    )


def real_positions(batch: dict[str, torch.Tensor]) -> float:
    """Fraction of the padded [regions ; text] positions that hold real input."""
    real = batch["attention_mask"].sum() + batch["region_mask"].sum()
    return float(real) / (batch["attention_mask"].numel() + batch["region_mask"].numel())


# --------------------------------------------------------------------------------------------------
# The VisualBERT peer
# --------------------------------------------------------------------------------------------------
def equal_work_visualbert_layers(config: InterBertConfig, text_positions: int, region_positions: int) -> int:
    """Layers of a single-stream model over [text ; regions] that do InterBERT's token-layers per example."""
    both = text_positions + region_positions
    token_layers = (
        config.num_single_stream_layers * both
        + config.num_text_stream_layers * text_positions
        + config.num_image_stream_layers * region_positions
    )
    return round(token_layers / both)


def visualbert_for(config: InterBertConfig, layers: int):
    from transformers import VisualBertConfig, VisualBertForPreTraining

    vb = VisualBertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        visual_embedding_dim=config.region_feature_size,
        hidden_act=config.hidden_act,
        max_position_embeddings=max(config.max_position_embeddings, 512),
    )
    return VisualBertForPreTraining(vb)


def visualbert_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same examples in VisualBERT's terms: [text ; regions], MLM labels over both, and its
    sentence-image label (0 = the caption matches, BERT's next-sentence convention)."""
    region_labels = torch.full(batch["region_mask"].shape, -100, dtype=torch.long)
    return dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
        visual_embeds=batch["region_features"],
        visual_attention_mask=batch["region_mask"],
        labels=torch.cat([batch["msm_labels"], region_labels], dim=1),
        sentence_image_labels=1 - batch["itm_labels"],
    )
