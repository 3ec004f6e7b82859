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
from interbert.data.sources import sources_from_config
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
    training_summary,
    verify_features,
    weighted_sources,
)
from interbert.recipes.settings import BertModelSettings, PretrainSettings
from interbert.recipes.validation import best_metric, best_model_saver, heldout_loss_eval_fn, run_validation_captions
from interbert.train import Trainer, main_process_first

logger = logging.getLogger(__name__)

REQUIRED = {"data.captions": "FILE", "data.features": "PATH"}  # setting -> what to pass
# what validation reports: the held-out total loss picks model_best by default; a component may instead
HELDOUT_LOSSES = ["loss", "msm_loss", "mrm_loss", "itm_loss", "itc_loss"]


def build_model(model_cfg: BertModelSettings, tokenizer, store, itm_negatives: str = "data") -> InterBertForPreTraining:
    """A new model sized to the data, or ``model.from_checkpoint``; ``itm_negatives``: where ITM's
    negatives come from (InterBertConfig.itm_negatives: ``data``, or ``in_batch`` pairs the model makes).
    It takes the ``model`` section whole, as every recipe's model builder does: where the model starts
    (preset, overrides, from_bert, from_checkpoint) is one group, all of it read here."""
    checkpoint = model_cfg.from_checkpoint
    if not checkpoint:
        return new_model(InterBertForPreTraining, tokenizer, store, preset_name=model_cfg.preset,
                         overrides=model_cfg.overrides, from_bert=model_cfg.from_bert, itm_negatives=itm_negatives)
    # model.overrides that do not fix the weights (the objectives' wiring, loss weights, dropouts) apply too
    model = load_model(checkpoint, task="pretraining",
                       config_updates={**checkpoint_updates(checkpoint, model_cfg.overrides), "itm_negatives": itm_negatives})
    target = mrm_target_of(store)
    if model.config.mrm_target != target:  # its MRM decoder has nothing to learn from these features
        raise ValueError(
            f"{checkpoint} predicts masked region {model.config.mrm_target} but {store.path} "
            f"{'has' if target == 'classes' else 'has no'} class distributions: continue on features of its kind"
        )
    return model


def pretraining_datasets(captions, val_captions, store, tokenizer, settings: dict,
                         ) -> tuple[PretrainingDataset, PretrainingDataset | None]:
    """The training set and, when there are ``val_captions``, the held-out one: the same ``settings``
    (:class:`PretrainingDataset`'s arguments), other captions. Under torchrun rank 0 computes each one's
    TF-IDF negatives into the cache first and the other ranks read them."""
    with main_process_first():
        dataset = PretrainingDataset(captions, store, tokenizer, **settings)
    if val_captions is None:
        return dataset, None
    with main_process_first():
        heldout = PretrainingDataset(val_captions, store, tokenizer, **settings)
    return dataset, heldout


def run(cfg: PretrainSettings | dict, resume: bool = False, source: str = "config") -> dict:
    """``cfg``: the settings, or a dict of them (checked and completed with the defaults); ``source``:
    where they came from (the config file), for error messages."""
    cfg = PretrainSettings.coerce(cfg, source)
    data, model_cfg, train_cfg = cfg.data, cfg.model, cfg.train
    require_settings(cfg, {} if data.sources else REQUIRED, source)
    out = start_run(train_cfg.output_dir, device=train_cfg.device, seed=train_cfg.seed, threads=cfg.threads,
                    source=source)
    if model_cfg.from_checkpoint:
        model_folder(model_cfg.from_checkpoint, "model.from_checkpoint", source)

    # load the data: every input is read and checked before the (slow) tokenizer, model and negatives are built
    sources = sources_from_config(vars(data), source)
    captions, store = training_data(sources, data.split, data.max_images)
    if train_cfg.eval_every:
        train_cfg = dataclasses.replace(train_cfg, best_metric=best_metric(train_cfg.best_metric, HELDOUT_LOSSES,
                                                                           "loss", source))
    caption_files = {s.name: s.captions for s in sources} if data.sources else {None: data.captions}
    val_captions = run_validation_captions(caption_files, data.val_captions, data.val_split, data.val_images, captions,
                                           bool(train_cfg.eval_every), source)
    if data.verify_features:
        verify_features(captions, store, progress=train_cfg.progress_bar)

    # build the tokenizer, the model and the datasets
    tokenizer = tokenizer_for([c.text for c in captions], out, data.vocab_size, load_from=data.tokenizer or model_cfg.from_bert,
                              lowercase=data.lowercase, resume=resume)
    model = build_model(model_cfg, tokenizer, store, "in_batch" if data.negatives == "in_batch" else "data")
    check_region_feature_size(model, store, source)
    settings = dict(  # how a caption becomes a training example: masking, negatives, task sampling
        max_tokens=data.max_tokens, max_regions=data.max_regions, msm=data.msm, mrm=data.mrm,
        word_segmenter=data.word_segmenter,
        hard_negatives="tfidf" if data.negatives == "tfidf" else None,
        hard_ratio=data.hard_ratio, hard_ratio_start=data.hard_ratio_start, num_hard=data.num_hard,
        clean_features=model.config.itm_inputs == "clean", task_sampling=data.task_sampling,
        p_positive=1.0 if data.negatives == "in_batch" else 0.5,
        cache_dir=out / "cache", seed=train_cfg.seed, region_cache=data.region_cache,
    )
    dataset, heldout = pretraining_datasets(captions, val_captions, store, tokenizer, settings)
    collate_fn = bucketed_collate(dataset, data.length_buckets, data.region_buckets, tokenizer.pad_token_id,
                                  msm_budget=data.msm_budget, batch_size=train_cfg.batch_size)
    # the pretraining losses on the validation split (why not zero-shot R@1: validation.py)
    eval_fn = heldout_loss_eval_fn(heldout, collate_fn, train_cfg.batch_size) if heldout is not None else None
    if data.task_sampling == "alternate":  # a step's heads are those of its task: DDP must look for the unused ones
        train_cfg = dataclasses.replace(train_cfg, find_unused_parameters=True)
    logger.info("pretraining on %d captions of %d images (%s negatives, hard share %s, %s/%s masking, matching on "
                "%s inputs, MSM on %s pairs, %s tasks)", len(dataset), len(dataset.image_ids), data.negatives,
                data.hard_ratio if data.hard_ratio_start is None else f"{data.hard_ratio_start}->{data.hard_ratio}",
                data.msm, data.mrm, model.config.itm_inputs, model.config.msm_pairs, data.task_sampling)

    # train, then save
    extra = {"recipe": "pretrain", "config": cfg.to_dict()}
    start = time.perf_counter()
    trainer = Trainer(model, weighted_sources(dataset, sources, train_cfg.seed), train_cfg, collate_fn=collate_fn,
                      lr_multiplier_for=bert_lr_multiplier(model_cfg.bert_lr_factor, model_cfg.from_bert),
                      eval_fn=eval_fn, save_best=best_model_saver(tokenizer, extra),
                      hparams={"recipe": extra["recipe"], **cfg.to_dict()})  # what train.report_to records
    install_run_tokenizer(tokenizer, trainer.dist.is_main)  # only now: a run refused before leaves the folder as it was
    result = trainer.fit(resume=resume)
    model_dir = save_trained(trainer, tokenizer, out, extra=extra)
    return training_summary(result, model_dir, time.perf_counter() - start, dataset)

