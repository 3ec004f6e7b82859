"""Retrieval fine-tuning recipe: the original's 4-way objective.

    interbert finetune retrieval --config configs/finetune_retrieval_tiny.yaml model.from_checkpoint=runs/pretrain/model

Each example is a group (positive, random caption, random image, hard negative image); the score
head is trained with cross-entropy over the group. From a pretraining checkpoint the score head
starts as the ITM margin (the zero-shot ranking); ``model.from_checkpoint: null`` starts from scratch
(the "w/o pretraining" baseline), or ``model.from_bert`` from a BERT text path.
"""

from __future__ import annotations

import logging
import time

from interbert.data.batches import RetrievalDataset
from interbert.data.tokenize import load_tokenizer
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
    verify_features,
)
from interbert.recipes.settings import RetrievalModelSettings, RetrievalSettings
from interbert.recipes.validation import (
    RETRIEVAL_METRICS,
    best_model_saver,
    retrieval_eval_fn,
    validation_captions,
    with_best_metric,
)
from interbert.train import Trainer, main_process_first

logger = logging.getLogger(__name__)

REQUIRED = {"data.captions": "FILE", "data.features": "PATH"}  # setting -> what to pass


def build_model(model_cfg: RetrievalModelSettings, tokenizer, store) -> InterBertForImageTextRetrieval:
    """``model.from_checkpoint`` with ``model.config_updates`` (e.g. itc_loss_weight for fine-tuning), or a
    new model sized to the data."""
    if model_cfg.from_checkpoint:
        return load_model(model_cfg.from_checkpoint, task="retrieval",
                          config_updates={**checkpoint_updates(model_cfg), **model_cfg.config_updates})
    return new_model(model_cfg, tokenizer, store, InterBertForImageTextRetrieval, **model_cfg.config_updates)


def run(cfg: RetrievalSettings | dict, resume: bool = False, source: str = "config") -> dict:
    """``cfg``: the settings, or a dict of them (checked and completed with the defaults); ``source``:
    where they came from (the config file), for error messages."""
    cfg = RetrievalSettings.coerce(cfg, source)
    data, model_cfg = cfg.data, cfg.model
    require_settings(cfg, REQUIRED, source)
    train_cfg, out = start_run(cfg, source)
    checkpoint = model_cfg.from_checkpoint
    if checkpoint:
        model_folder(checkpoint, "model.from_checkpoint", source)
    captions = captions_of_split(data.captions, data.split, data.max_images)
    # IR R@1 picks model_best by default: the paper's headline number (ViLBERT/InterBERT report IR only)
    train_cfg = with_best_metric(train_cfg, RETRIEVAL_METRICS, "ir_r1", source)
    val_captions = validation_captions(data, source) if train_cfg.eval_every else None
    store = feature_store(data.features)
    verify_features(captions, store, data, progress=train_cfg.progress_bar)
    tokenizer = load_tokenizer(checkpoint) if checkpoint else tokenizer_for(data, captions, out, model_cfg.from_bert, resume)
    model = build_model(model_cfg, tokenizer, store)
    check_region_feature_size(model, store, source)
    with main_process_first():  # rank 0 computes TF-IDF negatives (hard_negative: caption) into the cache
        dataset = RetrievalDataset(
            captions, store, tokenizer, max_tokens=data.max_tokens, max_regions=data.max_regions,
            hard_negative=data.hard_negative, num_hard=data.num_hard,
            cache_dir=out / "cache", seed=train_cfg.seed, region_cache=data.region_cache,
        )
    multiplier = bert_lr_multiplier(model_cfg)
    eval_fn = None
    if train_cfg.eval_every:
        eval_fn = retrieval_eval_fn(val_captions, store, tokenizer, data.max_tokens, data.max_regions)
    extra = {"recipe": "finetune_retrieval", "config": cfg.to_dict()}
    logger.info("retrieval fine-tuning on %d captions of %d images from %s", len(dataset), len(dataset.image_ids),
                checkpoint or ("BERT " + model_cfg.from_bert if model_cfg.from_bert else "scratch"))
    start = time.perf_counter()
    trainer = Trainer(model, dataset, train_cfg, collate_fn=bucketed_collate(dataset, data, tokenizer.pad_token_id),
                      lr_multiplier_for=multiplier, eval_fn=eval_fn, save_best=best_model_saver(tokenizer, extra))
    install_run_tokenizer(tokenizer, trainer.dist.is_main)  # only now: a run refused before leaves the folder as it was
    result = trainer.fit(resume=resume)
    model_dir = save_trained(trainer, tokenizer, out, extra=extra)
    return {"model_dir": str(model_dir), "steps": result.step, "seconds": time.perf_counter() - start,
            "history": result.history, "examples": len(dataset), "images": len(dataset.image_ids),
            "validation": result.eval_history, "best": result.best, "stopped_early": result.stopped_early,
            "compile_seconds": result.compile_seconds}
