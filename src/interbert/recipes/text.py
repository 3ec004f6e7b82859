"""Text-only tasks (GLUE-style) through InterBERT's text path: no regions, a BERT-style pooler + classifier.

    interbert finetune text --config configs/finetune_text_tiny.yaml data.train=glue/MRPC/train.tsv \
        data.dev=glue/MRPC/dev.tsv model.from_bert=path/to/bert
    interbert evaluate text --model runs/finetune_text_tiny/model --data glue/MRPC/dev.tsv

The model starts from a BERT folder (``model.from_bert``: its layers fill the single-stream module and
the text stream, so text-only input is plain BERT), from an InterBERT model folder
(``model.from_checkpoint``, e.g. after multimodal pretraining: its text path is kept, the classifier is
new), or from scratch (a WordPiece vocabulary trained on the training texts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

from torch import nn

from interbert.convert import from_bert
from interbert.data.glue import (
    TextClassificationDataset,
    classification_metrics,
    collate_text,
    read_glue,
    split_examples,
)
from interbert.data.tokenize import load_tokenizer
from interbert.loading import load_model
from interbert.modeling import InterBertForSequenceClassification
from interbert.recipes.common import (
    install_run_tokenizer,
    argmax_predictions,
    build_config,
    checkpoint_updates,
    model_folder,
    require_settings,
    save_trained,
    start_run,
    tokenizer_for,
)
from interbert.utils.config_files import ConfigError
from interbert.recipes.settings import ModelSettings, TextDataSettings, TextSettings
from interbert.recipes.validation import best_metric, best_model_saver
from interbert.train import Trainer

logger = logging.getLogger(__name__)

REQUIRED = {"data.train": "GLUE_TSV"}  # setting -> what to pass


def build_text_model(model_cfg: ModelSettings, tokenizer, num_labels: int) -> InterBertForSequenceClassification:
    """``model.from_checkpoint``, a BERT text path (``model.from_bert``) or a new model with the tokenizer's
    vocabulary, with a ``num_labels``-way classifier. It takes the ``model`` section whole, as every recipe's
    model builder does: where the model starts is one group, all of it read here."""
    checkpoint, overrides = model_cfg.from_checkpoint, model_cfg.overrides
    if checkpoint:  # a text model as it is; any other InterBERT keeps its text path
        return load_model(checkpoint, task="sequence_classification", num_labels=num_labels,
                          config_updates=checkpoint_updates(checkpoint, overrides))
    if model_cfg.from_bert:
        return from_bert(model_cfg.from_bert, model_cfg.preset, InterBertForSequenceClassification,
                         num_labels=num_labels, **overrides)
    return InterBertForSequenceClassification(build_config(model_cfg.preset, overrides, vocab_size=len(tokenizer),
                                                           num_labels=num_labels))


def predict_text(model: nn.Module, dataset: TextClassificationDataset, batch_size: int = 64, pad_token_id: int = 0) -> list[int]:
    """Arg-max class of every example, in order (eval mode; the model's mode is restored)."""
    return argmax_predictions(model, dataset, lambda examples: collate_text(examples, pad_token_id), batch_size)


def evaluate_text(model: nn.Module, dataset: TextClassificationDataset, f1: bool, batch_size: int = 64,
                  pad_token_id: int = 0) -> dict[str, float]:
    """Accuracy (and F1 of class 1 where the task reports it), in percent."""
    predictions = predict_text(model, dataset, batch_size, pad_token_id)
    return classification_metrics(predictions, [e.label for e in dataset.examples], f1=f1)


def train_and_dev_examples(train_file: str, task: str | None = None, dev_file: str | None = None, *,
                           test_fraction: float, split_seed: int, max_train_examples: int | None = None,
                           source: str = "config"):
    """(task, train examples, dev examples) of the GLUE TSV ``train_file`` (``data.train``; ``task``:
    ``data.task``, None: recognised from the header): dev from ``dev_file`` (``data.dev``) when given, else
    a ``test_fraction`` hold-out of train drawn by ``split_seed``; the first ``max_train_examples`` of train."""
    spec, train = read_glue(train_file, task)
    if dev_file:
        _, dev = read_glue(dev_file, spec.name)
    else:
        try:
            train, dev = split_examples(train, test_fraction, split_seed)
        except ValueError as e:
            raise ConfigError(f"{source}: data.test_fraction / data.split_seed: {e}") from None
    if max_train_examples:
        train = train[:max_train_examples]
    return spec, train, dev


def run(cfg: TextSettings | dict, resume: bool = False, source: str = "config") -> dict:
    """``cfg``: the settings, or a dict of them (checked and completed with the defaults); ``source``:
    where they came from (the config file), for error messages."""
    cfg = TextSettings.coerce(cfg, source)
    data, model_cfg, train_cfg = cfg.data, cfg.model, cfg.train
    require_settings(cfg, REQUIRED, source)
    out = start_run(train_cfg.output_dir, device=train_cfg.device, seed=train_cfg.seed, threads=cfg.threads,
                    source=source)
    if model_cfg.from_checkpoint:
        model_folder(model_cfg.from_checkpoint, "model.from_checkpoint", source)

    # load the data, build the tokenizer, the model and the datasets
    task, train, dev = train_and_dev_examples(data.train, data.task, data.dev, test_fraction=data.test_fraction,
                                              split_seed=data.split_seed, max_train_examples=data.max_train_examples,
                                              source=source)
    if train_cfg.eval_every:  # model_best by default: F1 where the task reports it (MRPC-style pairs), else accuracy
        train_cfg = dataclasses.replace(train_cfg, best_metric=best_metric(
            train_cfg.best_metric, ["accuracy", "f1"] if task.f1 else ["accuracy"], "f1" if task.f1 else "accuracy", source))
    tokenizer = tokenizer_for([e.text_a for e in train] + [e.text_b for e in train if e.text_b], out, data.vocab_size,
                              load_from=data.tokenizer or model_cfg.from_checkpoint or model_cfg.from_bert, resume=resume)
    model = build_text_model(model_cfg, tokenizer, num_labels=len(task.labels))
    max_tokens = data.max_tokens
    train_set = TextClassificationDataset(train, tokenizer, max_tokens)
    dev_set = TextClassificationDataset(dev, tokenizer, max_tokens)
    logger.info("%s: fine-tuning on %d examples, evaluating on %d", task.name, len(train_set), len(dev_set))

    # train, evaluate on dev, save
    start = time.perf_counter()
    extra = {"recipe": "finetune_text", "task": task.name, "config": cfg.to_dict()}
    eval_fn = None
    if train_cfg.eval_every:
        eval_fn = functools.partial(evaluate_text, dataset=dev_set, f1=task.f1, pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(model, train_set, train_cfg, collate_fn=functools.partial(collate_text, pad_token_id=tokenizer.pad_token_id),
                      eval_fn=eval_fn, save_best=best_model_saver(tokenizer, extra),
                      hparams={"recipe": extra["recipe"], **cfg.to_dict()})  # what train.report_to records
    install_run_tokenizer(tokenizer, trainer.dist.is_main)  # only now: a run refused before leaves the folder as it was
    result = trainer.fit(resume=resume)
    seconds = time.perf_counter() - start
    metrics = None
    if trainer.dist.is_main:  # the ranks hold the same weights: one evaluates and writes
        with trainer.averaged_weights() as trained:
            metrics = evaluate_text(trained, dev_set, task.f1, pad_token_id=tokenizer.pad_token_id)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    model_dir = save_trained(trainer, tokenizer, out, extra={**extra, "metrics": metrics})
    return {"model_dir": str(model_dir), "task": task.name, "metrics": metrics, "steps": result.step,
            "seconds": seconds, "train_examples": len(train_set), "dev_examples": len(dev_set), "history": result.history,
            "validation": result.eval_history, "best": result.best, "stopped_early": result.stopped_early,
            "compile_seconds": result.compile_seconds}


def run_evaluate(model_dir: str, data_path: str, task: str | None = None, max_tokens: int | None = None,
                 batch_size: int = 64) -> dict:
    """Evaluate a model folder on a labelled GLUE TSV; ``max_tokens`` defaults to the training value."""
    recipe_file = Path(model_dir) / "recipe.json"
    if max_tokens is None:
        trained = json.loads(recipe_file.read_text()) if recipe_file.exists() else {}
        max_tokens = int(((trained.get("config") or {}).get("data") or {}).get("max_tokens") or TextDataSettings.max_tokens)
    spec, examples = read_glue(data_path, task)
    model = load_model(model_dir, task="sequence_classification", num_labels=len(spec.labels))
    tokenizer = load_tokenizer(model_dir)
    metrics = evaluate_text(model, TextClassificationDataset(examples, tokenizer, max_tokens), spec.f1, batch_size,
                            tokenizer.pad_token_id)
    return {"task": spec.name, "examples": len(examples), **metrics}
