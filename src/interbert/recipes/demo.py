"""The main job (``make demo``): does pretraining help? Measured on the built-in benchmark.

1. Generate the benchmark (``interbert data synth``): scenes, a simulated detector's region features,
   captions; the test split holds twin images that only word-region binding tells apart.
2. Pretrain the ``tiny`` preset (MSM + MRM + ITM with TF-IDF hard negatives) on the pretraining images.
3. Fine-tune for retrieval (the original's 4-way objective) on a smaller, disjoint set of images —
   from the pretrained weights ("InterBERT") and from the same initialisation without pretraining
   ("w/o pretraining"), same data, steps and seed.
4. Evaluate both, and the pretrained model zero-shot, on the test split with the full protocol
   (every test caption against every test image), and print the table in the paper's layout.

Everything lands in ``--out``: data, runs, ``results.json``, ``results.md``, loss curves and R@K bars.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from interbert.config import InterBertConfig
from interbert.errors import UsageError
from interbert.recipes import finetune_retrieval, pretrain
from interbert.recipes.evaluate_retrieval import evaluate_retrieval
from interbert.utils.files import atomic_write, atomic_write_json, atomic_write_text
from interbert.utils.machine import cpu_model

logger = logging.getLogger(__name__)


@dataclass
class DemoPlan:
    """Sizes and settings of one demo run; the defaults fit ~15 minutes on 2 CPU cores."""

    lang: str = "en"
    seed: int = 0
    pretrain_images: int = 4000
    finetune_images: int = 300
    test_images: int = 80  # 40 twin pairs; 400 captions x 80 images = 32,000 scored pairs
    feature_dim: int = 2048
    max_tokens: int = 32
    max_regions: int = 24  # the simulated detector emits at most 23 proposals
    vocab_size: int = 400
    pretrain_steps: int = 800
    pretrain_batch: int = 32
    pretrain_lr: float = 5e-4
    finetune_steps: int = 300
    finetune_batch: int = 16  # groups of 4 pairs
    finetune_lr: float = 2e-4
    warmup_ratio: float = 0.1
    # Not in the paper: an in-batch contrastive loss on the single-modal embeddings, which gives the
    # matching head a signal from the first steps (the paper's ITM alone sits at chance for ~1,500
    # steps at this scale — see the issue notes); also what the search service's candidates use.
    embedding_size: int = 128
    itc_loss_weight: float = 1.0
    negatives: str = "tfidf"
    msm: str = "span"
    mrm: str = "group"
    hard_ratio: float = 0.5
    hard_ratio_start: float | None = None  # a share: ramp the hard share from it to hard_ratio over the run
    # What ITM/ITC see: clean (a second pass on the unmasked caption and regions) | masked (the original: the
    # inputs MSM/MRM mask). Clean: IR R@1 17.6 vs 11.3, zero-shot 13.2 vs 5.3 (results/ablations.md), and
    # still 12.5 / 6.7 for masked with 1.4x the steps.
    itm_inputs: str = "clean"
    msm_pairs: str = "all"  # pairs MSM is taken on: all (the original) | matched
    # joint: every step takes every objective | alternate: UNITER-style, masked and matching steps in turn
    task_sampling: str = "joint"
    # the model's size, and RQ4 (benchmarks/bert_init.py): a BERT folder for the text path (its WordPiece
    # vocabulary then tokenises), or, from scratch, a vocabulary to tokenise with (null: one trained on the captions)
    preset: str = "tiny"
    layers: list[int] | None = None  # [single-stream, text-stream, image-stream] depths; None: the preset's
    # every dropout of the model (hidden, attention, ITM head); None: the preset's 0.1. Off: IR R@1 20.3 +- 0.2 vs
    # 17.6 +- 1.9, zero-shot 16.3 vs 13.2 over 3 seeds (results/ablations.md), and a tiny step ~19% faster on 2 cores
    dropout: float | None = 0.0
    from_bert: str | None = None
    tokenizer: str | None = None
    # VCR columns (--vcr): one multiple-choice model on Q->A and QA->R of the benchmark's VCR questions,
    # from the pretrained weights and from scratch. Off by default: it roughly doubles the run time.
    vcr: bool = False
    vcr_steps: int = 300
    vcr_batch: int = 16
    vcr_lr: float = 5e-4
    notes: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, **kw) -> DemoPlan:
        """A smoke run: every stage for a few steps on a few images (numbers meaningless)."""
        return cls(pretrain_images=60, finetune_images=20, test_images=10, feature_dim=64, pretrain_steps=6,
                   pretrain_batch=8, finetune_steps=4, finetune_batch=4, vocab_size=120, vcr_steps=3, vcr_batch=2, **kw)


def _train_section(out: Path, seed: int, steps: int, batch: int, lr: float, warmup_ratio: float, ema: float | None) -> dict:
    return {
        "output_dir": str(out), "seed": seed, "batch_size": batch, "max_steps": steps, "learning_rate": lr,
        "warmup_ratio": warmup_ratio, "weight_decay": 0.01, "max_grad_norm": 1.0, "ema_decay": ema,
        "save_every": None, "log_every": 10, "num_workers": 0, "progress_bar": True, "tensorboard": True,
    }


# every dropout field of the model's config (hidden, attention, both streams, the ITM head)
DROPOUTS = tuple(name for name in inspect.signature(InterBertConfig.__init__).parameters if name.endswith("_dropout_prob"))


def _model_section(plan: DemoPlan) -> dict:
    overrides = {"embedding_size": plan.embedding_size, "itc_loss_weight": plan.itc_loss_weight,
                 "itm_inputs": plan.itm_inputs, "msm_pairs": plan.msm_pairs}
    if plan.layers:
        single, text, image = plan.layers
        overrides.update(num_single_stream_layers=single, num_text_stream_layers=text, num_image_stream_layers=image)
    if plan.dropout is not None:
        overrides.update({name: plan.dropout for name in DROPOUTS})
    return {"preset": plan.preset, "from_bert": plan.from_bert, "overrides": overrides}


def _pretrain_data(plan: DemoPlan, data: dict) -> dict:
    return {**data, "split": "train", "vocab_size": plan.vocab_size, "negatives": plan.negatives, "msm": plan.msm,
            "mrm": plan.mrm, "hard_ratio": plan.hard_ratio, "hard_ratio_start": plan.hard_ratio_start,
            "task_sampling": plan.task_sampling, "tokenizer": plan.tokenizer,
            # Chinese: character tokens, masked as whole jieba words
            "word_segmenter": "jieba" if plan.lang == "zh" else None}


def generate_data(plan: DemoPlan, data_dir: Path) -> dict:
    from interbert.synthetic import MANIFEST, generate

    manifest_file = data_dir / MANIFEST
    want = dict(images=plan.pretrain_images + plan.finetune_images + plan.test_images, lang=plan.lang,
                seed=plan.seed, feature_dim=plan.feature_dim, fmt="store")  # memory-mapped: ~7x faster batches than TSV
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_text())
        settings = manifest["settings"]
        if all(settings.get(k) == v for k, v in want.items()):
            logger.info("reusing the benchmark in %s", data_dir)
            return manifest
    logger.info("generating the built-in benchmark in %s", data_dir)
    # the synth "val" split is the fine-tuning set; "train" is the (larger, disjoint) pretraining set
    return generate(data_dir, val_images=plan.finetune_images, test_images=plan.test_images, **want)


def run_demo(out: Path, plan: DemoPlan) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest = generate_data(plan, out / "data")
    data = variant_data(plan, manifest, out / "data")
    captions, features = data["captions"], data["features"]
    model_section = _model_section(plan)
    timings = {"data": time.perf_counter() - start}

    # 2. pretraining
    t = time.perf_counter()
    pre = pretrain.run(pretrain_config(out, plan, data))
    timings["pretrain"] = time.perf_counter() - t

    # 3. fine-tuning, with and without pretraining (same tokenizer, data, steps and seed)
    def finetune(name: str, checkpoint: str | None) -> dict:
        t = time.perf_counter()
        cfg = {
            # from a checkpoint its weights say it all; without one, the text path is BERT's where the plan says
            "model": {**model_section, "from_checkpoint": checkpoint, **({"from_bert": None} if checkpoint else {})},
            "data": {**data, "split": "val", "tokenizer": pre["model_dir"], "hard_negative": "image", "num_hard": 20},
            "train": _train_section(out / name, plan.seed, plan.finetune_steps, plan.finetune_batch,
                                    plan.finetune_lr, plan.warmup_ratio, None),
        }
        result = finetune_retrieval.run(cfg)
        timings[name] = time.perf_counter() - t
        return result

    ft_scratch = finetune("finetune_scratch", None)
    ft_pre = finetune("finetune_pretrained", pre["model_dir"])

    # 4. evaluation on the test split (full protocol)
    def evaluate(name: str, model_dir: str, zero_shot: bool) -> dict:
        t = time.perf_counter()
        r = evaluate_retrieval(model_dir, captions, features, split="test", zero_shot=zero_shot,
                               max_tokens=plan.max_tokens, max_regions=plan.max_regions,
                               histogram=out / f"ranks_{name}.png", progress=True)
        timings[f"evaluate_{name}"] = time.perf_counter() - t
        return r

    results = {
        "w/o pretraining": evaluate("scratch", ft_scratch["model_dir"], False),
        "InterBERT": evaluate("interbert", ft_pre["model_dir"], False),
        "zero-shot": evaluate("zero_shot", pre["model_dir"], True),
    }
    # VCR (optional): the benchmark's questions are English, so a Chinese run's vocabulary cannot read them
    if plan.vcr and plan.lang == "en":
        from interbert.recipes.vcr import demo_vcr

        t = time.perf_counter()
        for name, checkpoint in (("w/o pretraining", None), ("InterBERT", pre["model_dir"])):
            tag = "vcr_scratch" if checkpoint is None else "vcr_pretrained"
            results[name]["vcr"] = demo_vcr(out / tag, out / "data", manifest, checkpoint, plan.vcr_steps,
                                            plan.vcr_batch, plan.vcr_lr, plan.seed)
        timings["vcr"] = time.perf_counter() - t

    # 5. a search index over the test images, for `interbert serve`
    t = time.perf_counter()
    from interbert.serve.index import build_index

    build_index(ft_pre["model_dir"], features, out / "index", captions=captions, thumbnails=out / "data" / "images",
                split="test", max_regions=plan.max_regions)
    timings["index"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    summary = {
        "plan": plan.__dict__, "machine": machine(), "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "data": {"splits": manifest["splits"], "baseline_bag_of_words": manifest.get("baseline_bag_of_words")},
        "results": results,
        "train_curves": {"pretrain": pre["history"], "finetune w/o pretraining": ft_scratch["history"],
                         "finetune InterBERT": ft_pre["history"]},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    table = results_table(summary)
    (out / "results.md").write_text(table)
    write_plots(summary, out)
    return summary


FINAL_STEPS = 100  # the window of the end-of-pretraining loss means and of the "ITM learned" step


# name -> (row label, changes to the demo plan). The first is the reference: the demo's own recipe.
ABLATIONS = {
    "interbert": ("group masking + TF-IDF hard negatives (InterBERT), masked matching as the original",
                  {"itm_inputs": "masked"}),
    # the first table's variants (results/ablations.md, old code), each with the original's masked matching
    "plain_masking": ("plain masking (token MSM, per-region MRM), masked matching", {"msm": "token", "mrm": "region",
                                                                                     "itm_inputs": "masked"}),
    "random_negatives": ("random negatives, masked matching", {"negatives": "random", "itm_inputs": "masked"}),
    "in_batch_negatives": ("in-batch hard negatives (by embedding similarity), masked matching",
                           {"negatives": "in_batch", "itm_inputs": "masked"}),
    # the two halves of "plain masking", to tell which one moves the result
    "token_msm": ("token MSM only (group MRM kept), masked matching", {"msm": "token", "itm_inputs": "masked"}),
    "region_mrm": ("per-region MRM only (span MSM kept), masked matching", {"mrm": "region", "itm_inputs": "masked"}),
    # ITM and ITC on the clean (unmasked) caption and regions, a second pass (issue 13); the demo's default since
    "interbert_clean": ("InterBERT, clean matching (with dropout 0.1)", {"itm_inputs": "clean"}),
    "plain_masking_clean": ("plain masking, clean matching", {"msm": "token", "mrm": "region", "itm_inputs": "clean"}),
    "random_negatives_clean": ("random negatives, clean matching", {"negatives": "random", "itm_inputs": "clean"}),
    "scheduled_negatives_clean": ("TF-IDF share 0 -> 1 over the run, clean matching",
                                  {"hard_ratio_start": 0.0, "hard_ratio": 1.0, "itm_inputs": "clean"}),
    "in_batch_negatives_clean": ("in-batch hard negatives, clean matching", {"negatives": "in_batch", "itm_inputs": "clean"}),
    # equal work: clean matching's second pass makes a step ~1.4-1.6x the model time of a masked one, so
    # the masked recipe gets 1.4x the steps (1,120 at the demo's 800)
    "interbert_equal_time": ("InterBERT, masked matching, 1,120 steps (~ clean matching's compute)",
                             {"pretrain_steps": 1120, "itm_inputs": "masked"}),
    "interbert_clean_matched": ("InterBERT, clean matching, MSM on matched pairs only",
                                {"itm_inputs": "clean", "msm_pairs": "matched"}),
    # the pretraining learning rate doubled (5e-4 -> 1e-3, same warm-up): do the objectives learn late for want of it?
    "interbert_clean_lr1e-3": ("InterBERT, clean matching, pretraining lr 1e-3", {"itm_inputs": "clean", "pretrain_lr": 1e-3}),
    "plain_masking_clean_lr1e-3": ("plain masking, clean matching, pretraining lr 1e-3",
                                   {"msm": "token", "mrm": "region", "itm_inputs": "clean", "pretrain_lr": 1e-3}),
    # UNITER-style task sampling: masked steps (MSM + MRM, a caption with its own image) and matching steps
    # (ITM + ITC, unmasked pairs) in turn, one encoder pass each; at the demo's 800 steps each objective gets
    # half the updates, and at 1,600 steps the run costs about what the joint clean recipe's 800 do
    "interbert_alternate": ("InterBERT, masked and matching steps in turn (UNITER-style)",
                            {"itm_inputs": "clean", "task_sampling": "alternate"}),
    "interbert_alternate_equal_time": ("InterBERT, masked and matching steps in turn, 1,600 steps (~ joint's compute)",
                                       {"itm_inputs": "clean", "task_sampling": "alternate", "pretrain_steps": 1600}),
    # no dropout anywhere (pretraining and fine-tuning): at 800 steps on 4,000 images, does the regulariser
    # only slow learning? (It is also ~19% of a tiny clean step on 2 CPU cores: the mask's random numbers.)
    "interbert_clean_dropout0": ("InterBERT, clean matching, no dropout (the demo's default)",
                                 {"itm_inputs": "clean", "dropout": 0.0}),
}
# what the paper's ablation compares (group vs plain masking, TF-IDF vs random), under the default's clean
# matching, with the original's masked matching as the reference
DEFAULT_ABLATIONS = ("interbert", "interbert_clean", "plain_masking_clean", "random_negatives_clean")
ABLATION_SEEDS = (0, 1, 2)


def variant_data(plan: DemoPlan, manifest: dict, data_dir: Path) -> dict:
    """The ``data`` section every stage of a variant reads: the benchmark's files and the plan's padding."""
    return {"captions": str(data_dir / manifest["files"]["captions"]),
            "features": str(data_dir / manifest["files"]["regions"]),
            "max_tokens": plan.max_tokens, "max_regions": plan.max_regions}


def pretrain_config(out: Path, plan: DemoPlan, data: dict, device: str | None = None) -> dict:
    """The pretraining recipe's config for ``plan`` (writing to ``out/pretrain``), as the demo runs it."""
    return {
        "model": _model_section(plan),
        "data": _pretrain_data(plan, data),
        "train": {**_train_section(out / "pretrain", plan.seed, plan.pretrain_steps, plan.pretrain_batch,
                                   plan.pretrain_lr, plan.warmup_ratio, None), **({"device": device} if device else {})},
    }


def finetune_and_evaluate(out: Path, plan: DemoPlan, data: dict, pretrained: str | Path, device: str | None = None) -> dict:
    """Fine-tune retrieval from the ``pretrained`` folder as the demo does (``out/finetune``), then score the
    fine-tuned model and the pretrained one zero-shot on the test split: ``{"finetuned", "zero_shot"}``.
    ``pretrained`` may come from any pretraining (e.g. a converted checkpoint of the original code): the
    plan's fine-tuning settings apply to it, its sizes are its own."""
    on = {"device": device} if device else {}
    ft = finetune_retrieval.run({
        "model": {**_model_section(plan), "from_checkpoint": str(pretrained), "from_bert": None},
        "data": {**data, "split": "val", "tokenizer": str(pretrained), "hard_negative": "image", "num_hard": 20},
        "train": {**_train_section(out / "finetune", plan.seed, plan.finetune_steps, plan.finetune_batch,
                                   plan.finetune_lr, plan.warmup_ratio, None), **on},
    })
    kw = dict(split="test", max_tokens=plan.max_tokens, max_regions=plan.max_regions, progress=False, device=device or "cpu")
    return {"finetuned": evaluate_retrieval(ft["model_dir"], data["captions"], data["features"], **kw),
            "zero_shot": evaluate_retrieval(str(pretrained), data["captions"], data["features"], zero_shot=True, **kw)}


def run_variant(out: Path, plan: DemoPlan, manifest: dict, data_dir: Path, device: str | None = None) -> dict:
    """Pretrain with one plan, fine-tune from it, evaluate fine-tuned and zero-shot (no scratch row).
    ``device``: where to train and score (cpu, cuda, auto); None: training's default (auto), scoring on the CPU."""
    data = variant_data(plan, manifest, data_dir)
    start = time.perf_counter()
    pre = pretrain.run(pretrain_config(out, plan, data, device))
    scores = finetune_and_evaluate(out, plan, data, pre["model_dir"], device)
    return {**scores, "seconds": time.perf_counter() - start, "pretrain_seconds": pre["seconds"]}


def run_ablations(out: Path, plan: DemoPlan, manifest: dict, data_dir: Path,
                  variants: Sequence[str] = DEFAULT_ABLATIONS) -> dict:
    """Pretraining variants (masking, negatives), 3 seeds each: mean +- std of the retrieval recalls.

    Each (variant, seed) run leaves ``result.json`` in its folder with the plan it ran; a later call with
    the same plan reuses it, so an interrupted ablation resumes and new variants join an old table."""
    unknown = [v for v in variants if v not in ABLATIONS]
    if unknown:
        raise UsageError(f"unknown ablation(s) {unknown}; choose from {list(ABLATIONS)}")
    rows, curves, minutes, folders, extra = {}, {}, 0.0, {}, {}
    for variant in variants:
        label, change = ABLATIONS[variant]
        runs = []
        for seed in ABLATION_SEEDS:
            # the ablations keep the preset's dropout (0.1, the demo's default until it was switched off) unless
            # the row changes it, so every row of the table stays the run it was
            variant_plan = DemoPlan(**{**plan.__dict__, "dropout": None, **change, "seed": seed, "notes": []})
            folder = out / f"{variant}_seed{seed}"
            record = folder / "result.json"
            planned = json.loads(json.dumps(variant_plan.__dict__))
            if record.exists() and same_plan(json.loads(record.read_text()).get("plan"), planned):
                logger.info("ablation %s, seed %d: reusing %s", variant, seed, record)
                result = json.loads(record.read_text())
            else:
                logger.info("ablation %s, seed %d", variant, seed)
                result = {"plan": planned, **run_variant(folder, variant_plan, manifest, data_dir)}
                atomic_write_json(record, json.loads(json.dumps(result, default=float)))
            minutes += result.get("seconds", 0.0) / 60
            runs.append(result)
        metrics = {}
        for key, pick in (("IR R@1", ("finetuned", "R@1")), ("IR R@5", ("finetuned", "R@5")),
                          ("IR R@10", ("finetuned", "R@10")), ("zero-shot R@1", ("zero_shot", "R@1")),
                          ("zero-shot R@5", ("zero_shot", "R@5"))):
            values = [r[pick[0]]["image_retrieval"][pick[1]] for r in runs]
            metrics[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
        rows[label] = metrics
        folders[label] = [out / f"{variant}_seed{seed}" for seed in ABLATION_SEEDS]
        curves[label] = final_pretraining_losses(folders[label])
        steps = [itm_learning_step(f) for f in folders[label]]
        pretrain_minutes = [r["pretrain_seconds"] / 60 for r in runs if "pretrain_seconds" in r]
        extra[label] = {"itm_below_step": steps, "pretrain_minutes": pretrain_minutes,
                        "pretrain_steps": runs[0]["plan"]["pretrain_steps"]}
    columns = list(next(iter(rows.values())))
    table = [f"# Ablations (built-in benchmark, {len(ABLATION_SEEDS)} seeds, mean +- std)", "",
             "| pretraining | " + " | ".join(columns) + f" | ITM < {ITM_LEARNED} at step | pretrain steps | pretrain min |",
             "|---|" + "---|" * (len(columns) + 3)]
    for label, metrics in rows.items():
        cells = [f"{m['mean']:.1f} +- {m['std']:.1f}" for m in metrics.values()]
        e = extra[label]
        cells += [_learning_cell(e["itm_below_step"]), str(e["pretrain_steps"]),
                  f"{np.mean(e['pretrain_minutes']):.1f}" if e["pretrain_minutes"] else "-"]
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    table += ["", f"Seeds {list(ABLATION_SEEDS)}; each run pretrains {plan.pretrain_steps} steps (unless the row says) and "
              f"fine-tunes {plan.finetune_steps} steps as in the main table; {minutes:.1f} min of runs in all. "
              f"Machine: {machine()['cpu']}, torch threads {torch.get_num_threads()}. "
              f"'ITM < {ITM_LEARNED} at step': the first step whose {FINAL_STEPS}-step mean ITM loss is below "
              f"{ITM_LEARNED}, mean over the seeds that get there (how many in brackets); '-': none does.", ""]
    names = sorted({name for losses in curves.values() for name in losses})
    if names:
        table += [f"Pretraining losses at the end (mean of the last {FINAL_STEPS} steps, averaged over seeds; "
                  "ITM at chance is 0.693):", "",
                  "| pretraining | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        table += [f"| {label} | " + " | ".join(f"{losses[n]:.3f}" if n in losses else "" for n in names) + " |"
                  for label, losses in curves.items()]
        table += ["", "Losses over pretraining (100-step moving mean, averaged over seeds): ![ITM and ITC losses]"
                  "(ablations_losses.png)", ""]
    atomic_write_json(out / "ablations.json", {label: {**rows[label], "final_pretraining_losses": curves[label],
                                                       **extra[label]} for label in rows})
    atomic_write_text(out / "ablations.md", "\n".join(table))
    write_loss_plot(folders, out / "ablations_losses.png")
    return rows


ITM_LEARNED = 0.6  # the ITM loss (chance 0.693) below which the matching head has clearly left chance


def valued_steps(values: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, series)``: the 1-based pretraining steps that have a value and those values (a loss is
    None at the steps that do not take it, e.g. ITM at the masked steps of ``task_sampling=alternate``)."""
    steps = np.asarray([i + 1 for i, v in enumerate(values) if v is not None], dtype=int)
    return steps, np.asarray([v for v in values if v is not None], dtype=float)


def first_step_below(values: Sequence[float | None], threshold: float, window: int = FINAL_STEPS) -> int | None:
    """The first pretraining step (1-based) at which the mean of the last ``window`` values is below
    ``threshold``; None when it never is (steps without a value are skipped: the window then spans more steps)."""
    steps, series = valued_steps(values)
    if len(series) < window:
        return None
    means = np.convolve(series, np.ones(window) / window, mode="valid")  # means[i]: values i .. i+window-1
    below = np.flatnonzero(means < threshold)
    return int(steps[below[0] + window - 1]) if len(below) else None


def itm_learning_step(folder: Path) -> int | None:
    history_file = folder / "pretrain" / "loss_history.json"
    if not history_file.exists():
        return None
    return first_step_below(json.loads(history_file.read_text()).get("itm_loss", []), ITM_LEARNED)


def _learning_cell(steps: Sequence[int | None]) -> str:
    reached = [s for s in steps if s is not None]
    return f"{np.mean(reached):.0f} ({len(reached)}/{len(steps)})" if reached else "-"


def write_loss_plot(folders: dict[str, Sequence[Path]], path: Path, names: Sequence[str] = ("itm_loss", "itc_loss")) -> None:
    """One panel per loss: each row's pretraining curve (``FINAL_STEPS``-step moving mean), averaged over its runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5))
    colors = plt.get_cmap("tab20").colors  # one colour per row (the default cycle repeats after 10)
    for row, (label, runs) in enumerate(folders.items()):
        histories = [json.loads((f / "pretrain" / "loss_history.json").read_text()) for f in runs
                     if (f / "pretrain" / "loss_history.json").exists()]
        for ax, name in zip(np.atleast_1d(axes), names):
            valued = [valued_steps(h.get(name, [])) for h in histories]
            valued = [(steps, x) for steps, x in valued if len(x) >= FINAL_STEPS]
            if not valued:
                continue
            length = min(len(x) for _, x in valued)
            mean = np.mean([np.convolve(x[:length], np.ones(FINAL_STEPS) / FINAL_STEPS, mode="valid") for _, x in valued], 0)
            ax.plot(valued[0][0][FINAL_STEPS - 1:length], mean, label=label,  # at the step of each window's last value
                    color=colors[(2 * row) % 20 + (row // 10) % 2], ls=("-", "--")[(row // 10) % 2])
    for ax, name in zip(np.atleast_1d(axes), names):
        ax.set_xlabel("pretraining step")
        ax.set_ylabel(f"{name} ({FINAL_STEPS}-step mean, over seeds)")
        if name == "itm_loss":
            ax.axhline(0.693, color="grey", lw=0.8, ls=":")
            ax.axhline(ITM_LEARNED, color="grey", lw=0.8, ls="--")
    if np.atleast_1d(axes)[0].get_legend_handles_labels()[0]:
        np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    plt.close(fig)


# DemoPlan fields added after runs were recorded, and what those runs did (not today's defaults, which may change)
ADDED_FIELDS = {"hard_ratio_start": None, "itm_inputs": "masked", "msm_pairs": "all", "task_sampling": "joint",
                "preset": "tiny", "from_bert": None, "tokenizer": None, "layers": None, "dropout": None}


def same_plan(recorded: dict | None, planned: dict) -> bool:
    """Whether a finished run's plan is ``planned``; a field the record lacks because it was added to
    DemoPlan after the run counts as what those runs did (``ADDED_FIELDS``)."""
    if recorded is None:
        return False
    return {**{k: v for k, v in ADDED_FIELDS.items() if k in planned and k not in recorded}, **recorded} == planned


def final_pretraining_losses(folders: Sequence[Path]) -> dict[str, float]:
    """Each loss of the runs' pretraining (``pretrain/loss_history.json``) over its last steps, averaged
    over the runs that have one."""
    per_run = []
    for folder in folders:
        history_file = folder / "pretrain" / "loss_history.json"
        if history_file.exists():
            history = json.loads(history_file.read_text())
            per_run.append({name: float(np.mean([v for v in values if v is not None][-FINAL_STEPS:]))
                            for name, values in history.items() if name.endswith("_loss") and any(v is not None for v in values)})
    names = {name for run in per_run for name in run}
    return {name: float(np.mean([run[name] for run in per_run if name in run])) for name in sorted(names)}


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def results_table(summary: dict) -> str:
    r = summary["results"]
    plan = summary["plan"]
    splits = summary["data"]["splits"]
    ir = lambda name: r[name]["image_retrieval"]  # noqa: E731
    lines = [
        "# InterBERT demo: does pretraining help? (built-in benchmark)",
        "",
        f"Test split: {r['InterBERT']['num_captions']} captions x {r['InterBERT']['num_images']} images "
        f"({splits.get('test_twin_pairs', '?')} twin pairs), full protocol; chance R@1 = "
        f"{100 / r['InterBERT']['num_images']:.1f}%. Ties count against the model.",
        "",
        "| model | IR R@1 | IR R@5 | IR R@10 | median rank | mean rank | zero-shot R@1 | zero-shot R@5 | zero-shot R@10 |"
        + (" VCR Q->A | VCR QA->R | VCR Q->AR |" if "vcr" in r["InterBERT"] else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if "vcr" in r["InterBERT"] else ""),
    ]
    zs = ir("zero-shot")
    for name in ("w/o pretraining", "InterBERT"):
        m = ir(name)
        zero = [_fmt(zs["R@1"]), _fmt(zs["R@5"]), _fmt(zs["R@10"])] if name == "InterBERT" else ["-", "-", "-"]
        vcr = [_fmt(r[name]["vcr"][k]) for k in ("Q->A", "QA->R", "Q->AR")] if "vcr" in r[name] else []
        lines.append(f"| {name} | {_fmt(m['R@1'])} | {_fmt(m['R@5'])} | {_fmt(m['R@10'])} | "
                     f"{m['median_rank']:.0f} | {m['mean_rank']:.1f} | " + " | ".join(zero + vcr) + " |")
    if "vcr" in r["InterBERT"]:
        lines += ["", f"VCR: the benchmark's vcr/train.jsonl -> vcr/val.jsonl, {plan['vcr_steps']} steps x {plan['vcr_batch']} "
                  "questions, chance 25 / 25 / 6.25%."]
    base = summary["data"].get("baseline_bag_of_words") or {}
    lines += [
        "",
        f"Pretraining: {splits['train']} images, {plan['pretrain_steps']} steps x {plan['pretrain_batch']} "
        f"(MSM {plan['msm']}, MRM {plan['mrm']}, ITM with {plan['negatives']} negatives, hard ratio {plan['hard_ratio']}"
        f", ITM/ITC on {plan.get('itm_inputs', 'masked')} inputs"
        + (f", ITC weight {plan['itc_loss_weight']}" if plan["itc_loss_weight"] else "") + ").",
        f"Fine-tuning: {splits['val']} disjoint images, {plan['finetune_steps']} steps x {plan['finetune_batch']} groups of 4, "
        "same seed and data for both rows.",
    ]
    if base:
        lines.append(f"Bag-of-words baseline on this test split: R@1 {100 * base.get('R@1', 0):.1f}%, "
                     f"on twins {100 * base.get('twin_R@1', 0):.1f}% (ties against).")
    m = summary["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; "
              f"total {summary['timings_s']['total'] / 60:.1f} min.", ""]
    if plan.get("notes"):
        lines += ["Notes:", *[f"- {n}" for n in plan["notes"]], ""]
    return "\n".join(lines)


def write_plots(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in summary["train_curves"].items():
        loss = [v for v in history.get("loss", []) if v is not None]
        if loss:
            k = max(1, len(loss) // 50)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            axes[0].plot(smooth, label=name)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (moving average)")
    axes[0].legend()
    names = list(summary["results"])
    ks = ["R@1", "R@5", "R@10"]
    width = 0.8 / len(names)
    for n, name in enumerate(names):
        values = [summary["results"][name]["image_retrieval"][k] for k in ks]
        axes[1].bar(np.arange(len(ks)) + n * width, values, width, label=name)
    axes[1].set_xticks(np.arange(len(ks)) + width * (len(names) - 1) / 2, ks)
    axes[1].set_ylabel("image retrieval recall (%)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=100)
    plt.close(fig)


def check_plan(plan: DemoPlan) -> None:
    """Refuse, before the data are generated, a BERT folder that is not there or too shallow for the layers."""
    if plan.from_bert:
        from interbert.convert import config_from_bert, local_pretrained, read_bert_config

        config_from_bert(read_bert_config(local_pretrained(plan.from_bert)), plan.preset, **_model_section(plan)["overrides"])


def run_cli(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(lang=args.lang, seed=args.seed, vcr=args.vcr, preset=args.preset, from_bert=args.from_bert, layers=args.layers)
    plan = DemoPlan.quick(**kw) if args.quick else DemoPlan(**kw)
    check_plan(plan)
    ablations = args.ablations or args.ablations_only or bool(args.ablation_variants)
    if not args.ablations_only:
        summary = run_demo(Path(args.out), plan)
        print()
        print(results_table(summary))
    if ablations:
        out = Path(args.out) / "ablations"
        out.mkdir(parents=True, exist_ok=True)
        manifest = generate_data(plan, Path(args.out) / "data")  # reuses the main run's benchmark
        run_ablations(out, plan, manifest, Path(args.out) / "data", args.ablation_variants or DEFAULT_ABLATIONS)
        print((out / "ablations.md").read_text())
    if args.ablations_only:
        return 0
    print(f"Results, plots and runs: {args.out}/ (results.md, results.json, results.png)")
    print(f"Search the test images:  interbert serve --index {args.out}/index   (then open http://127.0.0.1:8000/)")
    print("A/B test pretrained vs not on topic feeds: README.md, section 'A/B testing' (results/abtest.md: one run)")
    return 0
