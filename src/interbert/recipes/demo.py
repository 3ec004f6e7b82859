"""The main job (``make demo``): does pretraining help? Measured on the built-in benchmark.

1. Generate the benchmark (``interbert data synth``): scenes, a simulated detector's region features,
   captions; the test split holds twin images that only word-region binding tells apart.
2. Pretrain the ``tiny`` preset (MSM + MRM + ITM with TF-IDF hard negatives) on the pretraining images.
3. Fine-tune for retrieval (the original's 4-way objective) on a smaller, disjoint set of images —
   from the pretrained weights ("InterBERT") and from the same initialisation without pretraining
   ("w/o pretraining"), same data, steps and seed.
4. Evaluate both, and the pretrained model zero-shot, on the test split with the full protocol
   (every test caption against every test image), and print the table in the paper's layout.

Each stage's settings are a YAML file of ``configs/demo/`` read through the recipes' typed schema
(:mod:`interbert.recipes.demo_settings`); ``interbert demo key=value`` overrides any of them and
``--print-config`` prints them resolved. Everything lands in ``--out``: data, runs, ``results.json``,
``results.md``, loss curves and R@K bars.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from interbert.recipes import finetune_retrieval, pretrain
from interbert.recipes.demo_ablations import (  # noqa: F401  (they lived here: importable from here still)
    FINAL_STEPS,
    ITM_LEARNED,
    check_variants,
    final_pretraining_losses,
    first_step_below,
    itm_learning_step,
    load_ablations,
    run_ablations,
    valued_steps,
    write_loss_plot,
)
from interbert.recipes.demo_settings import (  # noqa: F401  (DROPOUTS lived here)
    DROPOUTS,
    DemoSettings,
    benchmark_files,
    evaluate_arguments,
    finetune_settings,
    flag_overrides,
    load_demo,
    overridable,
    plan_view,
    pretrain_settings,
)
from interbert.recipes.demo_stages import finetune_and_evaluate, generate_data, machine, run_variant  # noqa: F401
from interbert.recipes.evaluate_retrieval import evaluate_retrieval
from interbert.utils.typed_config import to_yaml

logger = logging.getLogger(__name__)


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def train_models(out: Path, demo: DemoSettings, files: dict[str, str], timings: dict[str, float]) -> dict[str, dict]:
    """Pretraining, then retrieval fine-tuning w/o it and from it (same tokenizer, data, steps and seed):
    each run's summary by its folder name."""
    with timed(timings, "pretrain"):
        pre = pretrain.run(pretrain_settings(demo, out, files))
    runs = {"pretrain": pre}
    for name, checkpoint in (("finetune_scratch", None), ("finetune_pretrained", pre["model_dir"])):
        with timed(timings, name):
            runs[name] = finetune_retrieval.run(finetune_settings(demo, out / name, files, pre["model_dir"], checkpoint))
    return runs


# the table's rows: (row, tag of its files and timing, the run whose model it scores, zero-shot)
ROWS = (("w/o pretraining", "scratch", "finetune_scratch", False), ("InterBERT", "interbert", "finetune_pretrained", False),
        ("zero-shot", "zero_shot", "pretrain", True))


def evaluate_models(out: Path, demo: DemoSettings, files: dict[str, str], runs: dict[str, dict],
                    timings: dict[str, float]) -> dict[str, dict]:
    """Every row's scores on the test split, full protocol."""
    results = {}
    for row, tag, run, zero_shot in ROWS:
        with timed(timings, f"evaluate_{tag}"):
            results[row] = evaluate_retrieval(runs[run]["model_dir"], files["captions"], files["features"],
                                              zero_shot=zero_shot, histogram=out / f"ranks_{tag}.png", progress=True,
                                              **evaluate_arguments(demo))
    return results


def add_vcr(out: Path, demo: DemoSettings, manifest: dict, pretrained: str, results: dict[str, dict]) -> None:
    """The VCR columns of both fine-tuned rows: from the pretrained weights and from scratch."""
    from interbert.recipes.vcr import demo_vcr

    vcr = demo.vcr
    for row, checkpoint in (("w/o pretraining", None), ("InterBERT", pretrained)):
        tag = "vcr_scratch" if checkpoint is None else "vcr_pretrained"
        results[row]["vcr"] = demo_vcr(out / tag, out / "data", manifest, checkpoint, vcr.max_steps, vcr.batch_size,
                                       vcr.learning_rate, demo.seed)


def run_demo(out: Path, demo: DemoSettings) -> dict:
    """Every stage of the demo into ``out``; the summary that ``results.json`` holds."""
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with timed(timings, "data"):
        manifest = generate_data(demo, out / "data")
    files = benchmark_files(manifest, out / "data")
    runs = train_models(out, demo, files, timings)
    results = evaluate_models(out, demo, files, runs, timings)
    # VCR (optional): the benchmark's questions are English, so a Chinese run's vocabulary cannot read them
    if demo.vcr.enabled and demo.data.lang == "en":
        with timed(timings, "vcr"):
            add_vcr(out, demo, manifest, runs["pretrain"]["model_dir"], results)
    with timed(timings, "index"):  # a search index over the test images, for `interbert serve`
        from interbert.serve.index import build_index

        build_index(runs["finetune_pretrained"]["model_dir"], files["features"], out / "index", captions=files["captions"],
                    thumbnails=out / "data" / "images", split=demo.evaluate.split, max_regions=demo.data.max_regions)
    timings["total"] = time.perf_counter() - start
    summary = {
        "plan": plan_view(demo), "config": demo.to_dict(), "machine": machine(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "data": {"splits": manifest["splits"], "baseline_bag_of_words": manifest.get("baseline_bag_of_words")},
        "results": results,
        "train_curves": {"pretrain": runs["pretrain"]["history"], "finetune w/o pretraining": runs["finetune_scratch"]["history"],
                         "finetune InterBERT": runs["finetune_pretrained"]["history"]},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "results.md").write_text(results_table(summary))
    write_plots(summary, out)
    return summary


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


def check_bert(demo: DemoSettings) -> None:
    """Refuse, before the data are generated, a BERT folder that is not there or too shallow for the layers."""
    model = demo.model.recipe_model()
    if model["from_bert"]:
        from interbert.convert import config_from_bert, local_pretrained, read_bert_config

        config_from_bert(read_bert_config(local_pretrained(model["from_bert"])), model["preset"], **model["overrides"])


# the files `interbert data synth` writes for the demo's store format, to print the stages' settings before it ran
GENERATED_FILES = {"files": {"captions": "captions.json", "regions": "regions"}}


def resolved_configs(demo: DemoSettings, out: Path) -> str:
    """The demo's settings and what each recipe of it gets, resolved, as YAML documents (``--print-config``)."""
    files = benchmark_files(GENERATED_FILES, out / "data")
    pretrained = str(out / "pretrain" / "model")
    stages = {"interbert pretrain": pretrain_settings(demo, out, files),
              "interbert finetune retrieval (InterBERT)": finetune_settings(demo, out / "finetune_pretrained", files,
                                                                            pretrained, pretrained),
              "interbert finetune retrieval (w/o pretraining)": finetune_settings(demo, out / "finetune_scratch", files,
                                                                                  pretrained, None)}
    docs = ["# interbert demo: its settings, resolved (configs/demo/ + flags + key=value overrides); the keys the\n"
            "# demo sets in the stages itself (files, padding, folders, seed) are in the recipes' documents below\n"
            + to_yaml(overridable(demo))]
    docs += [f"# {command}: the settings the demo runs it with\n" + to_yaml(settings) for command, settings in stages.items()]
    return "---\n".join(docs)


def run_cli(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [*flag_overrides(quick=args.quick, lang=args.lang, seed=args.seed, vcr=args.vcr, preset=args.preset,
                                 from_bert=args.from_bert, layers=args.layers), *args.overrides]
    demo = load_demo(overrides)
    out = Path(args.out)
    if args.print_config:
        print(resolved_configs(demo, out), end="")
        return 0
    check_bert(demo)
    if args.ablation_variants:  # a misspelt name is refused before the main run, not after it
        check_variants(load_ablations(), args.ablation_variants)
    if not args.ablations_only:
        summary = run_demo(out, demo)
        print()
        print(results_table(summary))
    if args.ablations or args.ablations_only or args.ablation_variants:
        (out / "ablations").mkdir(parents=True, exist_ok=True)
        manifest = generate_data(demo, out / "data")  # reuses the main run's benchmark
        run_ablations(out / "ablations", overrides, manifest, out / "data", args.ablation_variants)
        print((out / "ablations" / "ablations.md").read_text())
    if args.ablations_only:
        return 0
    print(f"Results, plots and runs: {args.out}/ (results.md, results.json, results.png)")
    print(f"Search the test images:  interbert serve --index {args.out}/index   (then open http://127.0.0.1:8000/)")
    print("A/B test pretrained vs not on topic feeds: README.md, section 'A/B testing' (results/abtest.md: one run)")
    return 0
