"""Pretraining recipe: masked group modeling (MSM + MRM) + image-text matching with hard negatives.

    interbert pretrain --config configs/pretrain_tiny.yaml data.captions=... data.features=... train.max_steps=500

Settings (:class:`~interbert.recipes.settings.PretrainSettings`): ``model`` (preset, field overrides,
``from_bert`` folder or ``from_checkpoint``), ``data`` (captions, features, split, masking and negative
modes), ``train`` (:class:`TrainConfig`).
Writes ``train.output_dir/model`` (save_pretrained + tokenizer), checkpoints and loss history.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from interbert.data.batches import PretrainingDataset
from interbert.loading import load_model
from interbert.modeling import InterBertForPreTraining
from interbert.recipes.common import (
    bucketed_collate,
    install_run_tokenizer,
    bert_lr_multiplier,
    check_region_feature_size,
    checkpoint_updates,
    model_folder,
    mrm_target_of,
    new_model,
    require_settings,
    save_trained,
    start_run,
    tokenizer_for,
    training_data,
    verify_features,
    weighted_sources,
)
from interbert.recipes.settings import BertModelSettings, PretrainSettings
from interbert.recipes.validation import best_model_saver, heldout_loss_eval_fn, validation_captions, with_best_metric
from interbert.train import Trainer, main_process_first

logger = logging.getLogger(__name__)

REQUIRED = {"data.captions": "FILE", "data.features": "PATH"}  # setting -> what to pass


def build_model(model_cfg: BertModelSettings, tokenizer, store, itm_negatives: str = "data") -> InterBertForPreTraining:
    """A new model sized to the data, or ``model.from_checkpoint``; ``itm_negatives``: where ITM's
    negatives come from (InterBertConfig.itm_negatives: ``data``, or ``in_batch`` pairs the model makes)."""
    checkpoint = model_cfg.from_checkpoint
    if not checkpoint:
        return new_model(model_cfg, tokenizer, store, InterBertForPreTraining, itm_negatives=itm_negatives)
    # model.overrides that do not fix the weights (the objectives' wiring, loss weights, dropouts) apply too
    model = load_model(checkpoint, task="pretraining",
                       config_updates={**checkpoint_updates(model_cfg), "itm_negatives": itm_negatives})
    target = mrm_target_of(store)
    if model.config.mrm_target != target:  # its MRM decoder has nothing to learn from these features
        raise ValueError(
            f"{checkpoint} predicts masked region {model.config.mrm_target} but {store.path} "
            f"{'has' if target == 'classes' else 'has no'} class distributions: continue on features of its kind"
        )
    return model


def run(cfg: PretrainSettings | dict, resume: bool = False, source: str = "config") -> dict:
    """``cfg``: the settings, or a dict of them (checked and completed with the defaults); ``source``:
    where they came from (the config file), for error messages."""
    cfg = PretrainSettings.coerce(cfg, source)
    data, model_cfg = cfg.data, cfg.model
    require_settings(cfg, {} if data.sources else REQUIRED, source)
    train_cfg, out = start_run(cfg, source)
    negatives = data.negatives
    if model_cfg.from_checkpoint:
        model_folder(model_cfg.from_checkpoint, "model.from_checkpoint", source)

    # every input is read and checked before the (slow) tokenizer, model and negatives are built
    captions, store = training_data(data, data.split, source)
    # the held-out total loss picks model_best by default; a component (itm_loss, ...) may instead
    train_cfg = with_best_metric(train_cfg, ["loss", "msm_loss", "mrm_loss", "itm_loss", "itc_loss"], "loss", source)
    val_captions = validation_captions(data, source) if train_cfg.eval_every else None
    verify_features(captions, store, data, progress=train_cfg.progress_bar)
    tokenizer = tokenizer_for(data, captions, out, model_cfg.from_bert, resume)
    model = build_model(model_cfg, tokenizer, store, "in_batch" if negatives == "in_batch" else "data")
    check_region_feature_size(model, store, source)
    dataset_settings = dict(
        max_tokens=data.max_tokens, max_regions=data.max_regions, msm=data.msm, mrm=data.mrm,
        word_segmenter=data.word_segmenter,
        hard_negatives="tfidf" if negatives == "tfidf" else None,
        hard_ratio=data.hard_ratio, hard_ratio_start=data.hard_ratio_start, num_hard=data.num_hard,
        clean_features=model.config.itm_inputs == "clean", task_sampling=data.task_sampling,
        p_positive=1.0 if negatives == "in_batch" else 0.5,
        cache_dir=out / "cache", seed=train_cfg.seed, region_cache=data.region_cache,
    )
    with main_process_first():  # rank 0 computes the TF-IDF negatives into the cache, the others read it
        dataset = PretrainingDataset(captions, store, tokenizer, **dataset_settings)
    train_set = weighted_sources(dataset, data, train_cfg.seed)
    multiplier = bert_lr_multiplier(model_cfg)
    collate_fn = bucketed_collate(dataset, data, tokenizer.pad_token_id)  # data.length_buckets / region_buckets
    eval_fn = None
    if train_cfg.eval_every:  # the pretraining losses on the validation split (why not zero-shot R@1: validation.py)
        with main_process_first():
            heldout = PretrainingDataset(val_captions, store, tokenizer, **dataset_settings)
        eval_fn = heldout_loss_eval_fn(heldout, collate_fn, train_cfg.batch_size)
    extra = {"recipe": "pretrain", "config": cfg.to_dict()}
    if data.task_sampling == "alternate":  # a step's heads are those of its task: DDP must look for the unused ones
        train_cfg = dataclasses.replace(train_cfg, find_unused_parameters=True)
    logger.info("pretraining on %d captions of %d images (%s negatives, hard share %s, %s/%s masking, matching on "
                "%s inputs, MSM on %s pairs, %s tasks)", len(dataset), len(dataset.image_ids), negatives,
                data.hard_ratio if data.hard_ratio_start is None else f"{data.hard_ratio_start}->{data.hard_ratio}",
                data.msm, data.mrm, model.config.itm_inputs, model.config.msm_pairs, data.task_sampling)
    start = time.perf_counter()
    trainer = Trainer(model, train_set, train_cfg, collate_fn=collate_fn, lr_multiplier_for=multiplier,
                      eval_fn=eval_fn, save_best=best_model_saver(tokenizer, extra))
    install_run_tokenizer(tokenizer, trainer.dist.is_main)  # only now: a run refused before leaves the folder as it was
    result = trainer.fit(resume=resume)
    model_dir = save_trained(trainer, tokenizer, out, extra=extra)
    return {"model_dir": str(model_dir), "steps": result.step, "seconds": time.perf_counter() - start,
            "history": result.history, "examples": len(dataset), "images": len(dataset.image_ids),
            "validation": result.eval_history, "best": result.best, "stopped_early": result.stopped_early,
            "compile_seconds": result.compile_seconds}
