"""Validation while training (``train.eval_every``): each recipe's metric on held-out data, which of
its metrics picks ``model_best/`` by default, and the function that writes that folder.

What each recipe evaluates:

- retrieval fine-tuning: the full protocol (every caption x every image) on the validation split,
  flattened to ``ir_r1 ir_r5 ir_r10 ir_median_rank ir_mean_rank``, the same for text retrieval
  (``tr_*``) and ``rsum``; ``data.val_images`` caps the images, since the cost grows with their square;
- VCR: ``q_a``, ``qa_r`` and ``q_ar`` accuracies on ``data.val``;
- text tasks: ``accuracy`` (and ``f1`` for the pair tasks that report it) on the dev examples;
- pretraining: the pretraining losses on the validation split (``loss`` and each ``*_loss``). Not
  zero-shot retrieval: that costs captions x images pair forwards and stays near chance for much of a
  pretraining run, so it says little while costing much; the held-out loss is the objective itself,
  one forward per held-out caption, with the same masks and negatives at every evaluation (they are
  seeded per example), so successive values are comparable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interbert.data import model_inputs
from interbert.data.captions import Caption, read_captions
from interbert.evaluate import retrieval_metrics
from interbert.model_card import write_model_card
from interbert.processing import save_processor
from interbert.recipes.settings import CaptionDataSettings
from interbert.train import loss_components
from interbert.utils.config_files import ConfigError

RETRIEVAL_METRICS = tuple(
    f"{side}_{name}" for side in ("ir", "tr") for name in ("r1", "r5", "r10", "median_rank", "mean_rank")
) + ("rsum",)
VCR_METRICS = {"Q->A": "q_a", "QA->R": "qa_r", "Q->AR": "q_ar"}  # TensorBoard-friendly names


def best_metric(chosen: str | None, metrics: Sequence[str], default: str, source: str = "config") -> str:
    """The validation metric that picks ``model_best/`` in a run that evaluates: ``chosen``
    (``train.best_metric``), or the recipe's ``default`` when the user chose none. A chosen metric the
    recipe does not compute (not in ``metrics``) is refused before training starts: found at the first
    evaluation, it would cost a run's first ``eval_every`` updates."""
    if chosen is None:
        return default
    if chosen not in metrics:
        raise ConfigError(f"{source}: train.best_metric={chosen!r} is not a validation metric of this "
                          f"recipe; choose one of {', '.join(metrics)}")
    return chosen


def validation_captions(data_cfg: CaptionDataSettings, source: str = "config") -> list[Caption]:
    """The validation captions of a ``data`` section, for callers that hold one (the recipes pass the values
    to :func:`validation_split_captions`): ``data.val_captions``, else ``data.sources`` or ``data.captions``,
    ``data.val_split``; the first ``data.val_images``."""
    if getattr(data_cfg, "val_captions", None):
        from interbert.recipes.common import captions_of_split

        return captions_of_split(data_cfg.val_captions, None, data_cfg.val_images)
    if getattr(data_cfg, "sources", None):
        from interbert.data.sources import sources_from_config

        files = {s.name: s.captions for s in sources_from_config(vars(data_cfg), source)}
    else:
        files = {None: data_cfg.captions}
    return validation_split_captions(files, data_cfg.val_split, data_cfg.val_images, source)


def validation_split_captions(caption_files: Mapping[str | None, str | Path], split: str | None,
                              max_images: int | None = None, source: str = "config") -> list[Caption]:
    """The captions of ``split`` (``data.val_split``; None: the file's ``val`` split), the first ``max_images``
    images (``data.val_images``) of each caption file. ``caption_files``: each source's file by its name
    (``data.sources``; ids namespaced by it, and each file must have the split), or ``{None: data.captions}``."""
    from interbert.data.sources import namespaced

    return [c for name, path in caption_files.items()
            for c in namespaced(_split_for_validation(path, split, max_images, source), name)]


def run_validation_captions(caption_files: Mapping[str | None, str | Path], val_captions: str | Path | None,
                            split: str | None, max_images: int | None, training: Sequence[Caption], evaluates: bool,
                            source: str = "config") -> list[Caption] | None:
    """The captions a run validates on; None when it does not evaluate (``evaluates``: ``train.eval_every``
    set). Every caption of ``val_captions`` (``data.val_captions``: a file of its own, as LAVIS ships its val
    split) when given, else the validation ``split`` of ``caption_files`` (:func:`validation_split_captions`).
    A validation file in a run that does not evaluate would be read for nothing, and is refused."""
    if val_captions is None:
        return validation_split_captions(caption_files, split, max_images, source) if evaluates else None
    if not evaluates:
        raise ConfigError(f"{source}: data.val_captions is read for validation only: set train.eval_every=N "
                          "(validate every N updates) or leave data.val_captions out")
    return held_out_captions(val_captions, max_images, training, "data.val_captions", source)


def held_out_captions(path: str | Path, max_images: int | None, training: Sequence[Caption], key: str,
                      source: str = "config") -> list[Caption]:
    """Every caption of the held-out file ``path`` (setting ``key``), its first ``max_images`` images. A file
    that shares an image with the ``training`` captions is refused: its numbers would score images the model
    trained on."""
    from interbert.recipes.common import captions_of_split

    captions = captions_of_split(path, None, max_images)
    shared = sorted({c.image_id for c in captions} & {c.image_id for c in training})
    if shared:
        listed = ", ".join(map(repr, shared[:3])) + (", ..." if len(shared) > 3 else "")
        raise ConfigError(f"{source}: {key}={path} shares {len(shared)} image{'s' if len(shared) > 1 else ''} with the "
                          f"training captions ({listed}): held-out captions must be of images the run does not train on")
    return captions


def evaluate_saved_weights(trainer, evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float] | None:
    """``evaluate`` (e.g. :func:`retrieval_eval_fn` of the test captions) on the weights the run saves (the
    EMA ones with EMA), on rank 0; None on the other ranks."""
    from interbert.train.evaluation import evaluate_model

    if not trainer.dist.is_main:
        return None
    with trainer.averaged_weights() as model, torch.no_grad():
        return evaluate_model(evaluate, model)


def _split_for_validation(captions: str | Path, split: str | None, max_images: int | None, source: str) -> list[Caption]:
    from interbert.recipes.common import captions_of_split

    if split is None:
        splits = {str(c.split) for c in read_captions(captions)}
        if "val" not in splits:
            raise ConfigError(f"{source}: train.eval_every needs validation captions, but {captions} has "
                              f"no 'val' split (its splits: {', '.join(sorted(splits))}); pass data.val_split=NAME")
        split = "val"
    return captions_of_split(captions, split, max_images)


def flat_retrieval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """:func:`interbert.evaluate.retrieval_metrics` as flat names (``ir_r1`` ...) for logs and TensorBoard."""
    flat = {}
    for side, key in (("ir", "image_retrieval"), ("tr", "text_retrieval")):
        summary = metrics[key]
        flat.update({f"{side}_r1": summary["R@1"], f"{side}_r5": summary["R@5"], f"{side}_r10": summary["R@10"],
                     f"{side}_median_rank": summary["median_rank"], f"{side}_mean_rank": summary["mean_rank"]})
    flat["rsum"] = metrics["rsum"]
    return flat


def retrieval_eval_fn(captions: Sequence[Caption], store, tokenizer, max_tokens: int, max_regions: int,
                      pair_batch_size: int = 512, compile: str = "off") -> Callable[[nn.Module], dict[str, float]]:
    """R@K, median and mean rank of the full protocol on ``captions`` (prepared once, scored per call).
    ``compile`` (the run's ``train.compile``): off, today's eager scoring; a mode, the pairs scored on static
    shapes through ``torch.compile`` (:mod:`interbert.static_scoring`), compiled at the first validation."""
    from interbert.recipes.evaluate_retrieval import prepare_split
    from interbert.retrieval import score_pairs

    token_ids, images, index, _ = prepare_split(captions, store, tokenizer, max_tokens, max_regions)

    def evaluate(model: nn.Module) -> dict[str, float]:
        report = score_pairs(model, token_ids, images, pair_batch_size=pair_batch_size, progress=False, compile=compile)
        return flat_retrieval_metrics(retrieval_metrics(report.scores, index))

    return evaluate


def heldout_loss_eval_fn(dataset, collate_fn, batch_size: int) -> Callable[[nn.Module], dict[str, float]]:
    """The model's losses on ``dataset`` (e.g. the pretraining losses on the validation split): each
    component's batch means, weighted by the examples in the batch."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for start in range(0, len(dataset), batch_size):
            examples = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
            batch = collate_fn(examples)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(batch).items()}
            for name, value in loss_components(model(**inputs)).items():
                if value is not None:
                    totals[name] = totals.get(name, 0.0) + float(value) * len(examples)
                    counts[name] = counts.get(name, 0) + len(examples)
        return {name: totals[name] / counts[name] for name in sorted(totals)}

    return evaluate


def best_model_saver(tokenizer, extra: Mapping[str, Any] | None = None) -> Callable[[nn.Module, Path], None]:
    """``save_best`` for the loop: ``model_best/`` as the recipe's ``model/`` is (save_pretrained, the
    tokenizer, recipe.json, the model card), so that every command that takes a model folder takes it too."""

    def save(model: nn.Module, folder: Path, evaluation: Mapping[str, Any] | None = None) -> None:
        model.save_pretrained(folder)
        # the card says which update this is and what it scored (``evaluation``: the loop's, see BestModel)
        evaluation = evaluation or {}
        write_model_card(folder, model, recipe=extra, steps=evaluation.get("step"), validation=evaluation.get("validation"),
                         selected_by=evaluation.get("selected_by"))
        save_processor(folder, tokenizer, model.config, extra)  # the tokenizer, truncating at the model's positions
        if extra:
            (folder / "recipe.json").write_text(json.dumps(extra, indent=2, default=str))

    return save
