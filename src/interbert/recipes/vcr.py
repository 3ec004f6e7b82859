"""VCR fine-tuning and evaluation: Q->A, QA->R and Q->AR with ``InterBertForMultipleChoice``.

    interbert finetune vcr --config configs/finetune_vcr_tiny.yaml data.train=vcr/train.jsonl \
        data.features=regions.tsv model.from_checkpoint=runs/pretrain_tiny/model
    interbert evaluate vcr --model runs/finetune_vcr_tiny/model --annotations vcr/val.jsonl --features regions.tsv

Each (item, task) is one 4-way example: the 4 texts share the item's regions, the score head gives one
logit per choice, cross-entropy over the 4. By default **one model is trained on both tasks** (Q->A and
QA->R examples mixed in one dataset: the input tells them apart, QA->R carrying the right answer in
its first segment); ``data.tasks: [Q->A]`` trains a single-task model. Evaluation scores both tasks
with the one model; an item counts for Q->AR only when its answer and its rationale are both right
(QA->R conditioned on the ground-truth answer, as the VCR protocol does).

From a pretraining checkpoint the score head starts as the ITM margin (as retrieval fine-tuning does);
``model.from_bert`` starts the text path from BERT; neither starts from scratch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import nn

from interbert.convert import from_bert
from interbert.data.features import FeatureStore, open_features
from interbert.data.tokenize import load_tokenizer
from interbert.data.vcr import TASKS, VcrDataset, VcrItem, collate_choices, object_names, read_vcr, render_tokens
from interbert.loading import load_model
from interbert.modeling import InterBertForMultipleChoice
from interbert.recipes.common import (
    install_run_tokenizer,
    argmax_predictions,
    build_config,
    checkpoint_updates,
    model_folder,
    require_settings,
    save_trained,
    start_run,
    train_run_wordpiece,
    verify_features,
)
from interbert.errors import UsageError
from interbert.utils.config_files import ConfigError
from interbert.recipes.settings import ModelSettings, VcrDataSettings, VcrSettings
from interbert.recipes.validation import VCR_METRICS, best_metric, best_model_saver
from interbert.train import Trainer

logger = logging.getLogger(__name__)

CHANCE = {"Q->A": 25.0, "QA->R": 25.0, "Q->AR": 6.25}
REQUIRED = {"data.train": "VCR_JSONL"}  # setting -> what to pass; and data.features or data.feature_dim


def vcr_accuracies(answer_predictions: Sequence[int], answer_labels: Sequence[int],
                   rationale_predictions: Sequence[int], rationale_labels: Sequence[int]) -> dict[str, float]:
    """Q->A, QA->R and Q->AR accuracy in percent; Q->AR counts an item only when both choices are right."""
    a_pred, a_true = np.asarray(answer_predictions), np.asarray(answer_labels)
    r_pred, r_true = np.asarray(rationale_predictions), np.asarray(rationale_labels)
    if not len(a_true) or not (len(a_pred) == len(a_true) == len(r_pred) == len(r_true)):
        raise ValueError("give one answer and one rationale prediction and label per item (and at least one item)")
    answer_right, rationale_right = a_pred == a_true, r_pred == r_true
    return {"Q->A": 100.0 * float(answer_right.mean()), "QA->R": 100.0 * float(rationale_right.mean()),
            "Q->AR": 100.0 * float((answer_right & rationale_right).mean())}


def build_vcr_model(model_cfg: ModelSettings, tokenizer, feature_dim: int) -> InterBertForMultipleChoice:
    """``model.from_checkpoint``, a BERT text path (``model.from_bert``) or a new model with the tokenizer's
    vocabulary, for ``feature_dim``-d regions. It takes the ``model`` section whole, as every recipe's model
    builder does: where the model starts is one group, all of it read here."""
    checkpoint, overrides = model_cfg.from_checkpoint, model_cfg.overrides
    if checkpoint:
        # a VCR folder as it is; a pretraining folder with its ITM margin as the choice score
        model = load_model(checkpoint, task="multiple_choice", config_updates=checkpoint_updates(checkpoint, overrides))
        if model.config.region_feature_size != feature_dim:
            raise UsageError(f"model.from_checkpoint={checkpoint} expects "
                             f"{model.config.region_feature_size}-d region features, the data has {feature_dim}-d")
        return model
    if model_cfg.from_bert:
        return from_bert(model_cfg.from_bert, model_cfg.preset, InterBertForMultipleChoice,
                         **{**overrides, "region_feature_size": feature_dim})
    return InterBertForMultipleChoice(build_config(model_cfg.preset, overrides, region_feature_size=feature_dim,
                                                   vocab_size=len(tokenizer)))


def vcr_texts(items: Sequence[VcrItem]) -> list[str]:
    """Every question, answer and rationale with tags as names (to train a vocabulary on)."""
    texts = []
    for item in items:
        names = object_names(item.objects)
        texts += [render_tokens(t, names) for t in (item.question, *item.answer_choices, *item.rationale_choices)]
    return texts


def unknown_word_rate(tokenizer, texts: Sequence[str]) -> float:
    """Share of tokens that are [UNK]: e.g. a Chinese caption vocabulary reading English VCR questions."""
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    return sum(i == tokenizer.unk_token_id for i in ids) / max(1, len(ids))


def vcr_tokenizer(items: Sequence[VcrItem], output_dir: Path, vocab_size: int, load_from: str | None = None,
                  resume: bool = False):
    """The tokenizer in ``load_from`` (``data.tokenizer``, else the folder the model starts from), warned
    about when it does not cover the VCR language, or a ``vocab_size`` WordPiece vocabulary trained on the
    ``items``' texts into ``output_dir/tokenizer``."""
    if load_from:
        tokenizer = load_tokenizer(load_from)
        rate = unknown_word_rate(tokenizer, vcr_texts(items[:200]))
        if rate > 0.05:
            logger.warning("%.0f%% of the VCR tokens are [UNK] with the tokenizer of %s: its vocabulary does not cover "
                           "the VCR language, so the choices read alike", 100 * rate, load_from)
        return tokenizer
    # trained on every rendered text: built only when no tokenizer is given (rendering reads every item)
    return train_run_wordpiece(vcr_texts(items), output_dir / "tokenizer", vocab_size=vocab_size, resume=resume)


def predict_choices(model: nn.Module, dataset: VcrDataset, batch_size: int = 32, pad_token_id: int = 0) -> list[int]:
    """The highest-scoring choice of every example of ``dataset``, in order (eval mode; mode restored)."""
    return argmax_predictions(model, dataset, lambda examples: collate_choices(examples, pad_token_id), batch_size)


def evaluate_vcr(model: nn.Module, items: Sequence[VcrItem], tokenizer, store: FeatureStore | None,
                 feature_dim: int | None = None, max_tokens: int = 64, max_regions: int = 36, batch_size: int = 32,
                 ) -> dict:
    """Q->A, QA->R, Q->AR accuracies (percent) of one model on ``items``, and the per-item predictions."""
    predictions = {}
    for task in TASKS:
        dataset = VcrDataset(items, tokenizer, store, tasks=[task], max_tokens=max_tokens, max_regions=max_regions,
                             feature_dim=feature_dim)
        predictions[task] = predict_choices(model, dataset, batch_size, tokenizer.pad_token_id)
    metrics = vcr_accuracies(predictions["Q->A"], [i.answer_label for i in items],
                             predictions["QA->R"], [i.rationale_label for i in items])
    return {**metrics, "items": len(items),
            "predictions": [{"annot_id": i.annot_id, "answer": a, "rationale": r}
                            for i, a, r in zip(items, predictions["Q->A"], predictions["QA->R"])]}


def _store_and_dim(features: str | None, feature_dim: int | None, source: str = "config",
                   ) -> tuple[FeatureStore | None, int]:
    """The store ``features`` (``data.features``) and its size, or no store and ``feature_dim``
    (``data.feature_dim``: stand-in features computed from the metadata)."""
    if features:
        store = open_features(features)
        return store, store.feature_dim
    dim = feature_dim  # >= 5: VcrDataSettings checks it
    if not dim:
        raise ConfigError(f"{source}: data.features or data.feature_dim is required (pass data.features=PATH, a "
                          "feature store keyed by the stem of img_fn, or data.feature_dim=N for stand-in features "
                          "computed from the metadata boxes and names)")
    logger.warning("no feature store: using stand-in features from the metadata (vcr_standin_features), not visual ones")
    return None, dim


def run(cfg: VcrSettings | dict, resume: bool = False, source: str = "config") -> dict:
    """``cfg``: the settings, or a dict of them (checked and completed with the defaults); ``source``:
    where they came from (the config file), for error messages."""
    cfg = VcrSettings.coerce(cfg, source)
    data, model_cfg, train_cfg = cfg.data, cfg.model, cfg.train
    require_settings(cfg, REQUIRED, source)
    out = start_run(train_cfg.output_dir, device=train_cfg.device, seed=train_cfg.seed, threads=cfg.threads,
                    source=source)
    tasks = data.tasks
    if model_cfg.from_checkpoint:
        model_folder(model_cfg.from_checkpoint, "model.from_checkpoint", source)
    if train_cfg.eval_every:  # model_best by default: Q->AR when both tasks are trained (the VCR headline), else the one
        default_best = VCR_METRICS["Q->AR"] if len(tasks) > 1 else VCR_METRICS[tasks[0]]
        train_cfg = dataclasses.replace(train_cfg, best_metric=best_metric(train_cfg.best_metric, list(VCR_METRICS.values()),
                                                                           default_best, source))
    if train_cfg.eval_every and not data.val:
        raise ConfigError(f"{source}: train.eval_every evaluates on data.val; pass data.val=VCR_JSONL")

    # load the data, build the tokenizer, the model and the dataset
    items = read_vcr(data.train, data.images_root)
    if data.max_items:
        items = items[: data.max_items]
    store, feature_dim = _store_and_dim(data.features, data.feature_dim, source)
    if store is not None and data.verify_features:
        verify_features(items, store, progress=train_cfg.progress_bar)
    tokenizer = vcr_tokenizer(items, out, data.vocab_size, resume=resume,
                              load_from=data.tokenizer or model_cfg.from_checkpoint or model_cfg.from_bert)
    model = build_vcr_model(model_cfg, tokenizer, feature_dim)
    sizes = dict(max_tokens=data.max_tokens, max_regions=data.max_regions)
    dataset = VcrDataset(items, tokenizer, store, tasks=tasks, feature_dim=feature_dim, **sizes)
    eval_fn = None
    if train_cfg.eval_every:
        val_items = read_vcr(data.val, data.images_root)

        def eval_fn(model):
            metrics = evaluate_vcr(model, val_items, tokenizer, store, feature_dim, batch_size=32, **sizes)
            return {name: metrics[task] for task, name in VCR_METRICS.items()}
    extra = {"recipe": "finetune_vcr", "config": cfg.to_dict(), "feature_dim": feature_dim, "stand_in_features": store is None, **sizes}
    logger.info("VCR fine-tuning on %d items x %s = %d examples", len(items), list(dataset.tasks), len(dataset))
    start = time.perf_counter()
    trainer = Trainer(model, dataset, train_cfg, collate_fn=functools.partial(collate_choices, pad_token_id=tokenizer.pad_token_id),
                      eval_fn=eval_fn, save_best=best_model_saver(tokenizer, extra),
                      hparams={"recipe": extra["recipe"], **cfg.to_dict()})  # what train.report_to records
    install_run_tokenizer(tokenizer, trainer.dist.is_main)  # only now: a run refused before leaves the folder as it was
    result = trainer.fit(resume=resume)
    seconds = time.perf_counter() - start
    summary = {"steps": result.step, "seconds": seconds, "items": len(items), "examples": len(dataset), "history": result.history,
               "validation": result.eval_history, "best": result.best, "stopped_early": result.stopped_early,
            "compile_seconds": result.compile_seconds}
    if data.val and trainer.dist.is_main:  # the ranks hold the same weights: one evaluates
        val_items = read_vcr(data.val, data.images_root)
        with trainer.averaged_weights() as trained:
            metrics = evaluate_vcr(trained, val_items, tokenizer, store, feature_dim, batch_size=32, **sizes)
        (out / "val_predictions.json").write_text(json.dumps(metrics.pop("predictions"), indent=1))
        summary["val"] = metrics
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    summary["model_dir"] = str(save_trained(trainer, tokenizer, out, extra={**extra, "metrics": summary.get("val")}))
    return summary


def run_evaluate(model_dir: str, annotations: str, features: str | None = None, images_root: str | None = None,
                 max_tokens: int | None = None, max_regions: int | None = None, batch_size: int = 32) -> dict:
    """Evaluate a model folder on a VCR jsonl; settings default to those the model was trained with."""
    recipe_file = Path(model_dir) / "recipe.json"
    trained = json.loads(recipe_file.read_text()) if recipe_file.exists() else {}
    model = load_model(model_dir, task="multiple_choice")
    tokenizer = load_tokenizer(model_dir)
    store = open_features(features) if features else None
    items = read_vcr(annotations, images_root)
    metrics = evaluate_vcr(model, items, tokenizer, store, feature_dim=model.config.region_feature_size,
                           max_tokens=max_tokens or trained.get("max_tokens", VcrDataSettings.max_tokens),
                           max_regions=max_regions or trained.get("max_regions", VcrDataSettings.max_regions),
                           batch_size=batch_size)
    return metrics


def demo_vcr(out_dir: Path, data_dir: Path, manifest: dict, pretrained_model_dir: str | None, steps: int,
             batch_size: int, lr: float, seed: int) -> dict:
    """VCR on the built-in benchmark for the demo table: fine-tune one model on both tasks of
    ``vcr/train.jsonl`` (features from the benchmark's regions, tokenizer from the pretrained model when
    given) and return {"Q->A": %, "QA->R": %, "Q->AR": %} on ``vcr/val.jsonl`` (chance 25 / 25 / 6.25)."""
    files = manifest["files"]
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    cfg = {
        "model": {"preset": "tiny", "overrides": {}, "from_checkpoint": pretrained_model_dir, "from_bert": None},
        "data": {"train": str(data_dir / files["vcr"]["train"]), "val": str(data_dir / files["vcr"]["val"]),
                 "images_root": str(data_dir / files["vcr"]["images_root"]), "features": str(data_dir / files["regions"]),
                 "tasks": list(TASKS), "max_tokens": 40, "max_regions": 24, "vocab_size": 400},
        "train": {"output_dir": str(out_dir), "seed": seed, "batch_size": batch_size, "max_steps": steps,
                  "learning_rate": lr, "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0,
                  "progress_bar": False, "tensorboard": False, "save_every": None},
    }
    summary = run(cfg)
    return {k: summary["val"][k] for k in ("Q->A", "QA->R", "Q->AR")}
