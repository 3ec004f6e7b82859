"""The model card (README.md) every saved model folder carries: what the model is, what it was trained
on and how far, and how to load it. A folder found months later on a shared disk explains itself."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from interbert.modeling import InterBertPreTrainedModel

# The task interbert.load_model takes to get each head back as it was saved.
TASK_OF = {
    "InterBertForPreTraining": "pretraining",
    "InterBertForImageTextRetrieval": "retrieval",
    "InterBertForMultipleChoice": "multiple_choice",
    "InterBertForSequenceClassification": "sequence_classification",
}
# data.* settings that say where the data came from
DATA_KEYS = ("captions", "features", "split", "train", "dev", "val", "images_root", "task", "tokenizer")
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


def model_card(model: InterBertPreTrainedModel, recipe: Mapping | None = None, steps: int | None = None,
               history: Mapping[str, Sequence[float | None]] | None = None, metrics: Mapping | None = None) -> str:
    """The card's markdown. ``recipe``: what ``save_trained`` writes to recipe.json (``recipe`` name and
    ``config``); ``steps``: optimizer updates done; ``metrics``: final evaluation results."""
    recipe = recipe or {}
    config, name = model.config, type(model).__name__
    cfg = recipe.get("config") or {}
    lines = ["---", "library_name: transformers", "tags: [interbert, vision-language, multimodal]", "---", "",
             f"# InterBERT: {name}", ""]
    if recipe.get("recipe"):
        lines += [f"Written by the `{recipe['recipe']}` recipe of interbert, an implementation of InterBERT "
                  "(Lin et al., 2020, *InterBERT: Vision-and-Language Interaction for Multi-modal Pretraining*).", ""]

    lines += ["## Architecture", "", "| setting | value |", "|---|---|"]
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
    lines += [f"| {key} | {value} |" for key, value in rows.items()] + [""]

    model_cfg, data_cfg = cfg.get("model") or {}, cfg.get("data") or {}
    start = (f"the model folder `{model_cfg['from_checkpoint']}`" if model_cfg.get("from_checkpoint")
             else f"BERT `{model_cfg['from_bert']}`" if model_cfg.get("from_bert") else "random initialisation")
    data = [f"- {key}: {_value(data_cfg[key])}" for key in DATA_KEYS if data_cfg.get(key) not in (None, "")]
    if data or cfg:
        lines += ["## Data and training", "", f"- started from {start}", *data]
        train = cfg.get("train") or {}
        for key in ("batch_size", "learning_rate", "ema_decay", "seed"):
            if train.get(key) is not None:
                lines.append(f"- train.{key}: {_value(train[key])}")
        if steps is not None:
            lines.append(f"- optimizer updates: {steps}")
        lines.append("")
    losses = final_losses(history or {})
    if losses:
        lines += [f"## Final losses (mean of the last {LAST_UPDATES} updates or fewer)", "", "| loss | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in losses.items()] + [""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_value(value)} |" for key, value in metrics.items() if isinstance(value, (int, float))] + [""]

    task = TASK_OF.get(name)
    task_argument = f', task="{task}"' if task else ""
    lines += ["## Loading", "", "```python", "import interbert", "",
              f'model = interbert.load_model("path/to/this/folder"{task_argument})']
    auto = {"InterBertForPreTraining": "AutoModelForPreTraining", "InterBertForMultipleChoice": "AutoModelForMultipleChoice",
            "InterBertForSequenceClassification": "AutoModelForSequenceClassification"}.get(name)
    if auto:  # the Auto classes know InterBERT once interbert.modeling is imported
        lines += ["", "import interbert.modeling  # registers InterBERT with the transformers Auto classes",
                  f"from transformers import {auto}", f'model = {auto}.from_pretrained("path/to/this/folder")']
    lines += ["```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, model: InterBertPreTrainedModel, **card: Any) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(model, **card), encoding="utf-8")
    return path


__all__ = ["final_losses", "model_card", "write_model_card"]
