"""``interbert pretrain``, ``interbert finetune <task>``, ``interbert evaluate <task>``, ``interbert demo``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from interbert.utils import add_config_arguments
from interbert.utils.logs import setup_cli_logging


def _print_summary(summary: dict) -> None:
    shown = {k: v for k, v in summary.items() if k != "history"}
    print(json.dumps(shown, indent=2, default=str))


def run_training(args, recipe: str, module: str) -> int:
    """``interbert <recipe>``: its settings (``--config`` + overrides, typed by
    :mod:`interbert.recipes.settings`), printed with ``--print-config`` or run by ``module.run``."""
    import importlib

    from interbert.recipes.settings import RECIPES

    settings = RECIPES[recipe].load(args.config, args.overrides)
    if args.print_config:
        from interbert.utils.typed_config import to_yaml

        print(f"# interbert {recipe}: every setting, resolved; run it again with --config THIS_FILE")
        print(to_yaml(settings), end="")
        return 0
    from interbert.train.tracking import require_backends

    require_backends(settings.train.reporting_backends())  # train.report_to's extras, before any work
    setup_cli_logging()
    created = first_missing(Path(settings.train.output_dir))  # the folder the run will create, if any
    try:
        summary = importlib.import_module(module).run(settings, resume=args.resume, source=args.config)
    except BaseException:
        if created is not None:  # a run refused (bad input, bad setting) or stopped before writing anything
            remove_if_empty(created)  # leaves no folder behind
        raise
    _print_summary(summary)
    return 0


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None: ``path`` exists)."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if it holds no file (empty sub-folders only): what a run that failed before writing
    anything leaves. A folder with any file in it (a trained vocabulary, a checkpoint, a log) is kept."""
    if any(files for _, _, files in os.walk(folder)):
        return
    shutil.rmtree(folder, ignore_errors=True)


def _cmd_pretrain(args) -> int:
    return run_training(args, "pretrain", "interbert.recipes.pretrain")


def _cmd_finetune_retrieval(args) -> int:
    return run_training(args, "finetune retrieval", "interbert.recipes.finetune_retrieval")


def _cmd_evaluate_retrieval(args) -> int:
    from interbert.recipes.evaluate_retrieval import run_cli

    setup_cli_logging()
    return run_cli(args)


def _cmd_demo(args) -> int:
    from interbert.extras import require_extra
    from interbert.recipes.demo import run_cli

    # the demo's last step builds a search index (FAISS): refuse now rather than after the training
    if not (args.ablations_only or args.print_config):
        require_extra("serve", "interbert demo (its last step builds a search index)")
    if args.lang == "zh":
        require_extra("zh", "interbert demo --lang zh (Chinese word segmentation)")

    setup_cli_logging()
    return run_cli(args)


def _depth(text: str) -> int:
    """A stream's number of layers: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of layers") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} layers: a stream has 0 or more")
    return value


def _training_parser(sub, name: str, help: str, config: str, func) -> argparse.ArgumentParser:
    """``config``: the name of the recipe's shipped config (package data), its ``--config`` default."""
    p = sub.add_parser(name, help=help, description=help + "  Overrides: dotted.key=value for any setting "
                       "(e.g. train.max_steps=500 data.max_tokens=48 model.overrides.hidden_dropout_prob=0.2): "
                       "model.*, data.*, train.* (every field of the training loop's TrainConfig) and threads. "
                       "--print-config lists every setting with its value.")
    add_config_arguments(p, default_config=config)
    p.add_argument("--resume", action="store_true", help="continue from train.output_dir/checkpoint.pt")
    p.add_argument("--print-config", action="store_true",
                   help="print every setting, resolved (config file, defaults, overrides), as YAML and exit; "
                        "the output is a config file that gives the same run")
    p.set_defaults(func=func)
    return p


# The `finetune` and `evaluate` groups: other task modules add their sub-commands to these.
finetune_subparsers = None
evaluate_subparsers = None


def register(subparsers) -> None:
    global finetune_subparsers, evaluate_subparsers
    _training_parser(subparsers, "pretrain", "Pretrain InterBERT with MSM + MRM + ITM (hard negatives).",
                     "pretrain_tiny", _cmd_pretrain)

    finetune = subparsers.add_parser("finetune", help="fine-tune for a downstream task")
    finetune_subparsers = finetune.add_subparsers(dest="task", metavar="<task>", required=True)
    _training_parser(finetune_subparsers, "retrieval", "Fine-tune for caption-based image retrieval (4-way objective).",
                     "finetune_retrieval_tiny", _cmd_finetune_retrieval)

    evaluate = subparsers.add_parser("evaluate", help="evaluate a model on a downstream task")
    evaluate_subparsers = evaluate.add_subparsers(dest="task", metavar="<task>", required=True)
    e = evaluate_subparsers.add_parser("retrieval", help="image retrieval, Flickr30K protocol (all captions x all images)")
    e.add_argument("--model", required=True, help="a model folder written by a recipe (or save_pretrained)")
    e.add_argument("--captions", required=True, help="Karpathy JSON, COCO JSON, Flickr8k token file, Flickr30k JSON, a LAVIS/ALBEF annotation list or JSON lines")
    e.add_argument("--features", required=True, help="feature store, TSV, npz folder, HDF5 ...")
    e.add_argument("--split", default="test", help="caption split to evaluate (default: test; 'all' for every caption)")
    e.add_argument("--zero-shot", action="store_true", help="score with the pretraining ITM head (no fine-tuning)")
    e.add_argument("--two-stage", type=int, metavar="K", help="also: embedding candidates, top K re-ranked by ITM")
    e.add_argument("--max-images", type=int, help="evaluate on the first N images of the split only")
    e.add_argument("--max-tokens", type=int, default=36)
    e.add_argument("--max-regions", type=int, default=36)
    e.add_argument("--pair-batch-size", type=int, default=512)
    e.add_argument("--threads", type=int, help="torch threads")
    e.add_argument("--device", default="auto", help="where to score: auto (the GPU if there is one), cpu, cuda, cuda:1 ...")
    e.add_argument("--compile", choices=["off", "default"], default="off",
                   help="off (default): today's eager scoring; default: pair batches padded to a few fixed shapes, "
                        "the scorer through torch.compile (the same scores; the first batch of each shape compiles)")
    e.add_argument("--out", help="write the JSON here (and the rank histogram next to it as .png)")
    e.add_argument("--histogram", help="rank histogram PNG path")
    e.set_defaults(func=_cmd_evaluate_retrieval)

    d = subparsers.add_parser("demo", help="the main job: synth data -> pretrain -> fine-tune -> evaluate -> table")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--lang", choices=["en", "zh"], help="the benchmark's language (default: en, configs/demo/data.yaml)")
    d.add_argument("--ablations", action="store_true", help="also group vs plain masking, TF-IDF vs random negatives (3 seeds)")
    d.add_argument("--ablation-variants", nargs="+", metavar="NAME",
                   help="which ablations --ablations runs (default: the `default` of configs/demo/ablations.yaml, which "
                        "lists every variant); finished runs under OUT/ablations are reused")
    d.add_argument("--ablations-only", action="store_true", help="run the ablations without the main table")
    d.add_argument("--vcr", action="store_true", help="add the VCR columns (Q->A, QA->R, Q->AR; roughly doubles the run time)")
    d.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test, numbers meaningless)")
    d.add_argument("--seed", type=int, help="the benchmark's and every stage's seed (default: 0, configs/demo/demo.yaml)")
    d.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    d.add_argument("--preset", choices=["tiny", "small", "base"],
                   help="the model's size (default: tiny, ~7 min on 2 cores; small from BERT: over 40 min, results/bert_init.md)")
    d.add_argument("--from-bert", metavar="DIR", help="the text path from this BERT folder (its width; its WordPiece "
                   "vocabulary tokenises), e.g. with --preset small and a 6-layer MiniLM (RQ4)")
    d.add_argument("--layers", type=_depth, nargs=3, metavar=("SINGLE", "TEXT", "IMAGE"),
                   help="stream depths (default: the preset's); from BERT, its first SINGLE + TEXT layers are used")
    d.add_argument("--print-config", action="store_true",
                   help="print the demo's settings and each stage's recipe settings, resolved, as YAML, and exit")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the demo's settings (configs/demo/*.yaml; --print-config lists them), e.g. "
                        "pretrain.train.max_steps=400 pretrain.data.msm=token; given before --ablation-variants")
    d.set_defaults(func=_cmd_demo)
