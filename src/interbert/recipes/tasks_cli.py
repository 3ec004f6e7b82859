"""``interbert finetune vcr|text`` and ``interbert evaluate vcr|text|mechanisms``: joins the groups of :mod:`interbert.recipes.cli`.

Registered after ``interbert.recipes.cli`` (``COMMAND_MODULES``), whose ``register`` creates the
``finetune`` / ``evaluate`` sub-parser groups this module adds to.
"""

from __future__ import annotations

import json

from interbert.recipes import cli as recipes_cli
from interbert.utils.logs import setup_cli_logging


def _cmd_finetune_vcr(args) -> int:
    return recipes_cli.run_training(args, "finetune vcr", "interbert.recipes.vcr")


def _cmd_finetune_text(args) -> int:
    return recipes_cli.run_training(args, "finetune text", "interbert.recipes.text")


def _write(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)


def _cmd_evaluate_vcr(args) -> int:
    from interbert.recipes.common import set_threads
    from interbert.recipes.vcr import run_evaluate

    setup_cli_logging()
    set_threads(args.threads)
    result = run_evaluate(args.model, args.annotations, args.features, args.images_root, args.max_tokens,
                          args.max_regions, args.batch_size)
    predictions = result.pop("predictions")
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as f:
            json.dump(predictions, f, indent=1)
    _write(result, args.out)
    return 0


def _cmd_evaluate_text(args) -> int:
    from interbert.recipes.common import set_threads
    from interbert.recipes.text import run_evaluate

    setup_cli_logging()
    set_threads(args.threads)
    _write(run_evaluate(args.model, args.data, args.task, args.max_tokens, args.batch_size), args.out)
    return 0


def _cmd_evaluate_mechanisms(args) -> int:
    from interbert.recipes.mechanisms import run_cli

    setup_cli_logging()
    return run_cli(args)


def register(subparsers) -> None:
    finetune, evaluate = recipes_cli.finetune_subparsers, recipes_cli.evaluate_subparsers
    if finetune is None or evaluate is None:
        raise RuntimeError("interbert.recipes.cli must be registered before interbert.recipes.tasks_cli")

    recipes_cli._training_parser(finetune, "vcr", "Fine-tune for VCR (Q->A and QA->R, 4-way multiple choice).",
                                 "finetune_vcr_tiny", _cmd_finetune_vcr)
    recipes_cli._training_parser(finetune, "text", "Fine-tune a text-only task (GLUE TSV) through the text path.",
                                 "finetune_text_tiny", _cmd_finetune_text)

    e = evaluate.add_parser("vcr", help="VCR accuracies: Q->A, QA->R and Q->AR (both right)")
    e.add_argument("--model", required=True, help="a model folder written by `finetune vcr` (or a pretraining model)")
    e.add_argument("--annotations", required=True, help="VCR jsonl (val.jsonl)")
    e.add_argument("--features", help="feature store keyed by the stem of img_fn; omit for stand-in features from the metadata")
    e.add_argument("--images-root", help="folder metadata_fn is relative to (default: vcr1images beside the jsonl, else its folder)")
    e.add_argument("--max-tokens", type=int, help="default: the value the model was trained with")
    e.add_argument("--max-regions", type=int, help="default: the value the model was trained with")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--threads", type=int, help="torch threads")
    e.add_argument("--out", help="write the accuracies (JSON) here")
    e.add_argument("--predictions", help="write each item's predicted answer and rationale (JSON) here")
    e.set_defaults(func=_cmd_evaluate_vcr)

    e = evaluate.add_parser("text", help="text-only task (GLUE TSV): accuracy, and F1 for MRPC/QQP")
    e.add_argument("--model", required=True, help="a model folder written by `finetune text`")
    e.add_argument("--data", required=True, help="a GLUE TSV file with labels")
    e.add_argument("--task", help="sst2 | mrpc | qqp | qnli | rte (default: recognised from the header)")
    e.add_argument("--max-tokens", type=int, help="default: the value the model was trained with (else 128)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--threads", type=int, help="torch threads")
    e.add_argument("--out", help="write the metrics (JSON) here")
    e.set_defaults(func=_cmd_evaluate_text)

    e = evaluate.add_parser(
        "mechanisms", help="MRM with group vs plain masking (leakage) and ITM on twin vs random pairs (issue 28)")
    e.add_argument("--model", required=True, help="a pretraining model folder (what `interbert pretrain` writes)")
    e.add_argument("--captions", required=True, help="caption file; twins from the twin_of keys of `data synth`'s")
    e.add_argument("--features", required=True, help="region features (TSV, npz folder or store) with class probabilities")
    e.add_argument("--split", default="test", help="images to measure on (default: test; 'all' for every image)")
    e.add_argument("--max-images", type=int, help="the first N images of the split only")
    e.add_argument("--max-tokens", type=int, default=36, help="caption tokens (default: 36)")
    e.add_argument("--max-regions", type=int, default=36, help="regions per image, global one included (default: 36)")
    e.add_argument("--seed", type=int, default=0, help="draws each caption's random negative image (default: 0)")
    e.add_argument("--batch-size", type=int, default=64, help="MRM examples per forward (ITM pairs: 8x)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    e.add_argument("--threads", type=int, help="torch threads")
    e.add_argument("--out", help="write the measurements (JSON) here")
    e.set_defaults(func=_cmd_evaluate_mechanisms)
