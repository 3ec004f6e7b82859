"""Retrieval fine-tuning recipe: the original's 4-way objective.

    interbert finetune retrieval --config configs/finetune_retrieval_tiny.yaml model.from_checkpoint=runs/pretrain/model

Each example is a group (positive, random caption, random image, hard negative image); the score
head is trained with cross-entropy over the group. From a pretraining checkpoint the score head
starts as the ITM margin (the zero-shot ranking); ``model.from_checkpoint: null`` starts from scratch
(the "w/o pretraining" baseline), or ``model.from_bert`` from a BERT text path.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from interbert.data.batches import RetrievalDataset
from interbert.loading import load_model
from interbert.modeling import InterBertForImageTextRetrieval
from interbert.recipes.common import (
    bucketed_collate,
    install_run_tokenizer,
    bert_lr_multiplier,
    captions_of_split,
    check_region_feature_size,
    checkpoint_updates,
    feature_store,
    model_folder,
    new_model,
    require_settings,
    save_trained,
    start_run,
    tokenizer_for,
    training_summary,
    verify_features,
)
from interbert.recipes.settings import RetrievalModelSettings, RetrievalSettings
from interbert.recipes.validation import (
    RETRIEVAL_METRICS,
    best_metric,
    best_model_saver,
    evaluate_saved_weights,
    held_out_captions,
    retrieval_eval_fn,
    run_validation_captions,
)
from interbert.train import Trainer, main_process_first

logger = logging.getLogger(__name__)

REQUIRED = {"data.captions": "FILE", "data.features": "PATH"}  # setting -> what to pass


def build_model(model_cfg: RetrievalModelSettings, tokenizer, store) -> InterBertForImageTextRetrieval:
    """``model.from_checkpoint`` with ``model.config_updates`` (e.g. itc_loss_weight for fine-tuning), or a
    new model sized to the data. It takes the ``model`` section whole, as every recipe's model builder does:
    where the model starts and what changes in it is one group, all of it read here."""
    checkpoint = model_cfg.from_checkpoint
    if checkpoint:
        return load_model(checkpoint, task="retrieval",
                          config_updates={**checkpoint_updates(checkpoint, model_cfg.overrides), **model_cfg.config_updates})
    return new_model(InterBertForImageTextRetrieval, tokenizer, store, preset_name=model_cfg.preset,
                     overrides=model_cfg.overrides, from_bert=model_cfg.from_bert, **model_cfg.config_updates)


def run(cfg: RetrievalSettings | dict, resume: bool = False, source: str = "config") -> dict:
    """``cfg``: the settings, or a dict of them (checked and completed with the defaults); ``source``:
    where they came from (the config file), for error messages."""
    cfg = RetrievalSettings.coerce(cfg, source)
    data, model_cfg, train_cfg = cfg.data, cfg.model, cfg.train
    require_settings(cfg, REQUIRED, source)
    out = start_run(train_cfg.output_dir, device=train_cfg.device, seed=train_cfg.seed, threads=cfg.threads,
                    source=source)
    checkpoint = model_cfg.from_checkpoint
    if checkpoint:
        model_folder(checkpoint, "model.from_checkpoint", source)

    # load the data: every input is read and checked before the tokenizer, model and negatives are built
    captions = captions_of_split(data.captions, data.split, data.max_images)
    if train_cfg.eval_every:  # IR R@1 picks model_best by default: the paper's headline number (ViLBERT/InterBERT report IR only)
        train_cfg = dataclasses.replace(train_cfg, best_metric=best_metric(train_cfg.best_metric, RETRIEVAL_METRICS,
                                                                           "ir_r1", source))
    val_captions = run_validation_captions({None: data.captions}, data.val_captions, data.val_split, data.val_images,
                                           captions, bool(train_cfg.eval_every), source)
    test_captions = held_out_captions(data.test_captions, None, captions, "data.test_captions", source) \
        if data.test_captions else None
    store = feature_store(data.features)
    if data.verify_features:
        verify_features(captions, store, progress=train_cfg.progress_bar)

    # build the tokenizer (a checkpoint's own first), the model and the dataset
    tokenizer = tokenizer_for([c.text for c in captions], out, data.vocab_size, lowercase=data.lowercase,
                              load_from=checkpoint or data.tokenizer or model_cfg.from_bert, resume=resume)
    model = build_model(model_cfg, tokenizer, store)
    check_region_feature_size(model, store, source)
    with main_process_first():  # rank 0 computes TF-IDF negatives (hard_negative: caption) into the cache
        dataset = RetrievalDataset(
            captions, store, tokenizer, max_tokens=data.max_tokens, max_regions=data.max_regions,
            hard_negative=data.hard_negative, num_hard=data.num_hard,
            cache_dir=out / "cache", seed=train_cfg.seed, region_cache=data.region_cache,
        )
    # validation and test captions are prepared (and their images checked) now, not after hours of training
    # with train.compile the pairs are scored on static shapes through torch.compile too (the same scores)
    eval_fn = retrieval_eval_fn(val_captions, store, tokenizer, data.max_tokens, data.max_regions,
                                compile=train_cfg.compile) if val_captions else None
    test_fn = retrieval_eval_fn(test_captions, store, tokenizer, data.max_tokens, data.max_regions,
                                compile=train_cfg.compile) if test_captions else None
    logger.info("retrieval fine-tuning on %d captions of %d images from %s", len(dataset), len(dataset.image_ids),
                checkpoint or ("BERT " + model_cfg.from_bert if model_cfg.from_bert else "scratch"))

    # train, then save
    extra = {"recipe": "finetune_retrieval", "config": cfg.to_dict()}
    start = time.perf_counter()
    trainer = Trainer(model, dataset, train_cfg, collate_fn=bucketed_collate(dataset, data.length_buckets, data.region_buckets,
                                                                     tokenizer.pad_token_id),
                      lr_multiplier_for=bert_lr_multiplier(model_cfg.bert_lr_factor, model_cfg.from_bert),
                      eval_fn=eval_fn, save_best=best_model_saver(tokenizer, extra),
                      hparams={"recipe": extra["recipe"], **cfg.to_dict()})  # what train.report_to records
    install_run_tokenizer(tokenizer, trainer.dist.is_main)  # only now: a run refused before leaves the folder as it was
    result = trainer.fit(resume=resume)
    test = {"test": evaluate_saved_weights(trainer, test_fn)} if test_fn else {}
    model_dir = save_trained(trainer, tokenizer, out, extra={**extra, **test})
    return {**training_summary(result, model_dir, time.perf_counter() - start, dataset), **test}
