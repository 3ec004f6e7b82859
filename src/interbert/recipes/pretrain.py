"""Pretraining recipe: masked group modeling (MSM + MRM) + image-text matching with hard negatives.

    interbert pretrain --config configs/pretrain_tiny.yaml data.captions=... data.features=... train.max_steps=500

Config sections: ``model`` (preset, field overrides, ``from_bert`` folder or ``from_checkpoint``),
``data`` (captions, features, split, masking and negative modes), ``train`` (:class:`TrainConfig`).
Writes ``train.output_dir/model`` (save_pretrained + tokenizer), checkpoints and loss history.
"""

from __future__ import annotations

import functools
import logging
import time

from interbert.data.batches import PretrainingDataset, collate
from interbert.config import ITM_INPUTS, MSM_PAIRS
from interbert.data.masking import TEXT_MASKERS
from interbert.loading import load_model
from interbert.modeling import InterBertForPreTraining
from interbert.recipes.common import (
    bert_lr_multiplier,
    check_choice,
    check_region_feature_size,
    model_folder,
    mrm_target_of,
    new_model,
    require_settings,
    save_trained,
    setting,
    start_run,
    tokenizer_for,
    training_data,
    verify_features,
    weighted_sources,
)
from interbert.recipes.validation import best_model_saver, heldout_loss_eval_fn, validation_captions, with_best_metric
from interbert.train import Trainer, main_process_first
from interbert.utils.config_files import ConfigError

logger = logging.getLogger(__name__)

# tfidf: the paper's ITM-hn (TF-IDF-similar captions of other images); random: other images' captions;
# in_batch: matched pairs only, re-paired in the model with batch images drawn by embedding similarity
NEGATIVES = ("tfidf", "random", "in_batch")
REQUIRED = {"data.captions": "FILE", "data.features": "PATH"}  # setting -> what to pass


def build_model(model_cfg: dict, tokenizer, store) -> InterBertForPreTraining:
    checkpoint = model_cfg.get("from_checkpoint")
    if not checkpoint:
        return new_model(model_cfg, tokenizer, store, InterBertForPreTraining)
    model = load_model(checkpoint, task="pretraining")
    target = mrm_target_of(store)
    if model.config.mrm_target != target:  # its MRM decoder has nothing to learn from these features
        raise ValueError(
            f"{checkpoint} predicts masked region {model.config.mrm_target} but {store.path} "
            f"{'has' if target == 'classes' else 'has no'} class distributions: continue on features of its kind"
        )
    return model


def share(cfg: dict, key: str, default: float | None, source: str) -> float | None:
    """A setting that is a share in [0, 1] (or null where ``default`` is None), refused by name otherwise."""
    value = setting(cfg, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{source}: {key} must be a share between 0 and 1, not {value!r}")
    return float(value)


def run(cfg: dict, resume: bool = False, source: str = "config") -> dict:
    """``source``: where ``cfg`` came from (the config file), for error messages."""
    require_settings(cfg, {} if setting(cfg, "data.sources") else REQUIRED, source)
    train_cfg, out = start_run(cfg, source)
    data, model_cfg = cfg["data"], cfg["model"]
    negatives = check_choice(cfg, "data.negatives", NEGATIVES, "tfidf", source)
    check_choice(cfg, "data.msm", TEXT_MASKERS, "span", source)
    check_choice(cfg, "data.mrm", ("group", "region"), "group", source)
    # how the objectives are wired (InterBertConfig fields): set on a continued checkpoint too
    objectives = {key: check_choice(cfg, f"model.overrides.{key}", choices, choices[0], source)
                  for key, choices in (("itm_inputs", ITM_INPUTS), ("msm_pairs", MSM_PAIRS))
                  if setting(cfg, f"model.overrides.{key}") is not None}
    hard_ratio, hard_ratio_start = (share(cfg, key, default, source)
                                    for key, default in (("data.hard_ratio", 1.0), ("data.hard_ratio_start", None)))
    if model_cfg.get("from_checkpoint"):
        model_folder(model_cfg["from_checkpoint"], "model.from_checkpoint", source)

    # every input is read and checked before the (slow) tokenizer, model and negatives are built
    captions, store = training_data(data, data.get("split", "train"), source)
    # the held-out total loss picks model_best by default; a component (itm_loss, ...) may instead
    train_cfg = with_best_metric(train_cfg, ["loss", "msm_loss", "mrm_loss", "itm_loss", "itc_loss"], "loss", source)
    val_captions = validation_captions(data, source) if train_cfg.eval_every else None
    verify_features(captions, store, data, progress=train_cfg.progress_bar)
    tokenizer = tokenizer_for(data, captions, out, model_cfg.get("from_bert"), resume)
    model = build_model(model_cfg, tokenizer, store)
    check_region_feature_size(model, store, source)
    model.config.itm_negatives = "in_batch" if negatives == "in_batch" else "data"
    for key, value in objectives.items():
        setattr(model.config, key, value)
    region_cache = check_choice(cfg, "data.region_cache", (True, False, "auto"), "auto", source)
    dataset_settings = dict(
        max_tokens=data.get("max_tokens", 36), max_regions=data.get("max_regions", 36),
        msm=data.get("msm", "span"), mrm=data.get("mrm", "group"),
        word_segmenter=data.get("word_segmenter"),
        hard_negatives="tfidf" if negatives == "tfidf" else None,
        hard_ratio=hard_ratio, hard_ratio_start=hard_ratio_start, num_hard=data.get("num_hard", 10),
        clean_features=model.config.itm_inputs == "clean",
        p_positive=1.0 if negatives == "in_batch" else 0.5,
        cache_dir=out / "cache", seed=train_cfg.seed, region_cache=region_cache,
    )
    with main_process_first():  # rank 0 computes the TF-IDF negatives into the cache, the others read it
        dataset = PretrainingDataset(captions, store, tokenizer, **dataset_settings)
    train_set = weighted_sources(dataset, data, train_cfg.seed)
    multiplier = bert_lr_multiplier(model_cfg)
    collate_fn = functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
    eval_fn = None
    if train_cfg.eval_every:  # the pretraining losses on the validation split (why not zero-shot R@1: validation.py)
        with main_process_first():
            heldout = PretrainingDataset(val_captions, store, tokenizer, **dataset_settings)
        eval_fn = heldout_loss_eval_fn(heldout, collate_fn, train_cfg.batch_size)
    extra = {"recipe": "pretrain", "config": cfg}
    logger.info("pretraining on %d captions of %d images (%s negatives, hard share %s, %s/%s masking, matching on "
                "%s inputs, MSM on %s pairs)", len(dataset), len(dataset.image_ids), negatives,
                hard_ratio if hard_ratio_start is None else f"{hard_ratio_start}->{hard_ratio}", data.get("msm", "span"),
                data.get("mrm", "group"), model.config.itm_inputs, model.config.msm_pairs)
    start = time.perf_counter()
    trainer = Trainer(model, train_set, train_cfg, collate_fn=collate_fn, lr_multiplier_for=multiplier,
                      eval_fn=eval_fn, save_best=best_model_saver(tokenizer, extra))
    result = trainer.fit(resume=resume)
    model_dir = save_trained(trainer, tokenizer, out, extra=extra)
    return {"model_dir": str(model_dir), "steps": result.step, "seconds": time.perf_counter() - start,
            "history": result.history, "examples": len(dataset), "images": len(dataset.image_ids),
            "validation": result.eval_history, "best": result.best, "stopped_early": result.stopped_early}
