"""The model card (README.md) every saved model folder carries: what the model is, what it was trained
on and how far, how well it did on validation, and how to load it. A folder found months later on a shared
disk explains itself, and on the Hub its metadata is searchable.

The card is a ``huggingface_hub.ModelCard``: its YAML header is ``ModelCardData`` (license, library, pipeline
tag, tags, the validation metrics as ``model-index`` results, and interbert's own keys ``training_data``,
``training_steps``, ``validation`` and, for ``model_best/``, ``selected_by``), so ``ModelCard.load`` reads it
back; the body is the markdown below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from interbert.modeling import InterBertPreTrainedModel
from interbert.remote_code import model_code

# The task interbert.load_model takes to get each head back as it was saved.
TASK_OF = {
    "InterBertForPreTraining": "pretraining",
    "InterBertForImageTextRetrieval": "retrieval",
    "InterBertForMultipleChoice": "multiple_choice",
    "InterBertForSequenceClassification": "sequence_classification",
}
# The Hub task each class serves. Region features are not images, so no image pipeline takes these models
# as they are; what they give is embeddings and matching scores (feature extraction), VCR's answer choice
# (visual question answering) and text classification.
PIPELINE_TAG = {
    "InterBertModel": "feature-extraction",
    "InterBertForPreTraining": "feature-extraction",
    "InterBertForImageTextRetrieval": "feature-extraction",
    "InterBertForMultipleChoice": "visual-question-answering",
    "InterBertForSequenceClassification": "text-classification",
}
LICENSE = "apache-2.0"  # the project's (pyproject.toml); a folder's weights are the user's, its code is ours
# library_name: the folder loads with transformers (its code travels in the folder: the Hub's custom_code tag)
TAGS = ["interbert", "vision-language", "multimodal", "custom_code"]
# data.* settings that say where the data came from
DATA_KEYS = ("captions", "features", "split", "val_captions", "val_split", "test_captions", "train", "dev", "val",
             "images_root", "task", "tokenizer")
LAST_UPDATES = 10  # final losses are the mean over this many last updates (one update is noisy)


def _value(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else f"`{x}`"


def final_losses(history: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """The mean of each loss series over its last ``LAST_UPDATES`` logged values; the total first."""
    out = {}
    for name, series in sorted(history.items(), key=lambda item: item[0] != "loss"):
        if name == "loss" or name.endswith("_loss"):
            tail = [v for v in series if v is not None and math.isfinite(v)][-LAST_UPDATES:]
            if tail:
                out[name] = sum(tail) / len(tail)
    return out


def _architecture_lines(model: InterBertPreTrainedModel) -> list[str]:
    config, name = model.config, type(model).__name__
    rows = {
        "hidden size / heads": f"{config.hidden_size} / {config.num_attention_heads}",
        "single-stream / text-stream / image-stream layers":
            f"{config.num_single_stream_layers} / {config.num_text_stream_layers} / {config.num_image_stream_layers}",
        "image-stream heads / intermediate size": f"{config.image_num_attention_heads} / {config.image_intermediate_size}",
        "region feature size": config.region_feature_size,
        "pooled size / fusion": f"{config.pooled_size} / {config.fusion}",
        "vocabulary": config.vocab_size,
        "parameters": f"{sum(p.numel() for p in model.parameters()):,}",
    }
    if name == "InterBertForPreTraining":
        rows["masked region target"] = config.mrm_target
        rows["ITM negatives"] = config.itm_negatives
    if name == "InterBertForSequenceClassification":
        rows["labels"] = config.num_labels
    if config.embedding_size:
        rows["search embedding size"] = config.embedding_size
    return ["## Architecture", "", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items()), ""]


def _training_lines(cfg: Mapping, steps: int | None) -> list[str]:
    model_cfg, data_cfg = cfg.get("model") or {}, cfg.get("data") or {}
    start = (f"the model folder `{model_cfg['from_checkpoint']}`" if model_cfg.get("from_checkpoint")
             else f"BERT `{model_cfg['from_bert']}`" if model_cfg.get("from_bert") else "random initialisation")
    data = [f"- {key}: {_value(data_cfg[key])}" for key in DATA_KEYS if data_cfg.get(key) not in (None, "")]
    if not (data or cfg):
        return []
    lines = ["## Data and training", "", f"- started from {start}", *data]
    train = cfg.get("train") or {}
    lines += [f"- train.{key}: {_value(train[key])}" for key in ("batch_size", "learning_rate", "ema_decay", "seed")
              if train.get(key) is not None]
    if steps is not None:
        lines.append(f"- optimizer updates: {steps}")
    return lines + [""]


def _numbers(metrics: Mapping | None) -> dict[str, float]:
    """The finite numeric entries of ``metrics`` (a split's name, a count of items or a NaN is no result)."""
    return {key: float(value) for key, value in (metrics or {}).items() if key != "step" and not isinstance(value, bool)
            and isinstance(value, (int, float)) and math.isfinite(value)}


def _validation_lines(validation: Mapping | None, selected_by: Mapping | None, metrics: Mapping | None) -> list[str]:
    lines = []
    if validation:
        lines += [f"## Validation (at update {validation['step']})", ""]
        if selected_by:
            lines += [f"The run's best evaluation by `{selected_by['metric']}` ({selected_by['mode']}imum): these are "
                      f"its weights, kept in `model_best/`.", ""]
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in _numbers(validation).items()), ""]
    if _numbers(metrics):
        lines += ["## Metrics", "", "| metric | value |", "|---|---|",
                  *(f"| {key} | {_value(value)} |" for key, value in (metrics or {}).items() if key in _numbers(metrics)), ""]
    return lines


def _loading_lines(name: str) -> list[str]:
    task = TASK_OF.get(name)
    task_argument = f', task="{task}"' if task else ""
    # the Auto class that loads this class from the folder's code (the folder's auto_map); the scorer has none
    auto = next((auto for auto, target in model_code()[1].items() if target.endswith(f".{name}")), None)
    lines = ["## Loading", "", "With interbert installed:", "", "```python", "import interbert", "",
             f'model = interbert.load_model("path/to/this/folder"{task_argument})', "```", "",
             "Without it: the folder carries its modeling code (`modeling_interbert.py` and the files it imports), "
             "which transformers runs when asked to:", "", "```python"]
    if auto:
        lines += [f"from transformers import {auto}", "",
                  f'model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)']
    else:  # no Auto class fits a pair scorer: the class comes from the folder's code by name
        lines += ["from transformers.dynamic_module_utils import get_class_from_dynamic_module", "",
                  f'{name} = get_class_from_dynamic_module("modeling_interbert.{name}", "path/to/this/folder")',
                  f'model = {name}.from_pretrained("path/to/this/folder")']
    return lines + ["```", ""]


def card_data(model: InterBertPreTrainedModel, recipe: Mapping | None = None, steps: int | None = None,
              metrics: Mapping | None = None, validation: Mapping | None = None,
              selected_by: Mapping | None = None, test: Mapping | None = None) -> ModelCardData:
    """The card's YAML header: the Hub's fields, and the metrics as ``model-index`` results: validation ones
    on the validation captions (``data.val_captions``, else the ``data.captions`` file's validation split),
    ``test`` ones on ``data.test_captions``."""
    name = type(model).__name__
    data_cfg = ((recipe or {}).get("config") or {}).get("data") or {}
    training_data = {key: data_cfg[key] for key in DATA_KEYS if data_cfg.get(key) not in (None, "")}
    extra: dict[str, Any] = {}
    if training_data:
        extra["training_data"] = training_data
    if steps is not None:
        extra["training_steps"] = steps
    if validation:
        extra["validation"] = {"step": validation["step"], "metrics": _numbers(validation)}
    if selected_by:
        extra["selected_by"] = {key: selected_by[key] for key in ("metric", "mode", "value")}
    results = {**_numbers(validation), **_numbers(metrics)}
    dataset = str(data_cfg.get("val_captions") or data_cfg.get("captions") or data_cfg.get("dev")
                  or data_cfg.get("val") or "validation data")
    held_out = [(dataset, data_cfg.get("val_split") or "validation", results)]
    if _numbers(test):
        held_out.append((str(data_cfg.get("test_captions") or "test data"), "test", _numbers(test)))
    pipeline = PIPELINE_TAG.get(name, "feature-extraction")
    eval_results = [EvalResult(task_type=pipeline, dataset_type=file, dataset_name=Path(file).name,
                               dataset_split=split, metric_type=metric, metric_value=value)
                    for file, split, numbers in held_out for metric, value in numbers.items()] or None
    return ModelCardData(license=LICENSE, library_name="transformers", pipeline_tag=pipeline, tags=TAGS,
                         model_name=f"interbert-{TASK_OF.get(name, 'encoder')}", eval_results=eval_results, **extra)


def model_card(model: InterBertPreTrainedModel, recipe: Mapping | None = None, steps: int | None = None,
               history: Mapping[str, Sequence[float | None]] | None = None, metrics: Mapping | None = None,
               validation: Mapping | None = None, selected_by: Mapping | None = None,
               test: Mapping | None = None) -> ModelCard:
    """The card. ``recipe``: what ``save_trained`` writes to recipe.json (``recipe`` name and ``config``);
    ``steps``: optimizer updates done; ``metrics``: final evaluation results; ``validation``: the evaluation of
    these weights during training (an entry of the loop's eval history: ``step`` and the metrics);
    ``selected_by``: for the best model, the loop's ``best`` summary (``metric``, ``mode``, ``value``);
    ``test``: results on the test captions (``data.test_captions``) with these weights."""
    recipe = recipe or {}
    name = type(model).__name__
    lines = [f"# InterBERT: {name}", ""]
    if recipe.get("recipe"):
        lines += [f"Written by the `{recipe['recipe']}` recipe of interbert, an implementation of InterBERT "
                  "(Lin et al., 2020, *InterBERT: Vision-and-Language Interaction for Multi-modal Pretraining*).", ""]
    lines += _architecture_lines(model) + _training_lines(recipe.get("config") or {}, steps)
    losses = final_losses(history or {})
    if losses:
        lines += [f"## Final losses (mean of the last {LAST_UPDATES} updates or fewer)", "", "| loss | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in losses.items()] + [""]
    lines += _validation_lines(validation, selected_by, metrics)
    if _numbers(test):
        lines += ["## Test", "", "| metric | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in _numbers(test).items()), ""]
    lines += _loading_lines(name)
    data = card_data(model, recipe, steps, metrics, validation, selected_by, test)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(folder: str | Path, model: InterBertPreTrainedModel, **card: Any) -> Path:
    """``model_card(model, **card)`` saved as the folder's README.md."""
    path = Path(folder) / "README.md"
    model_card(model, **card).save(path)
    return path


__all__ = ["card_data", "final_losses", "model_card", "write_model_card"]
