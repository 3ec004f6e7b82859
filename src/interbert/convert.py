"""Checkpoint conversion: BERT -> InterBERT initialisation, and the authors' original code -> ours.

Both are pure name maps over state dicts; every source weight must land somewhere (or be reported),
so a converter that silently drops a weight is impossible.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from interbert.config import PRESETS, InterBertConfig, preset
from interbert.errors import UsageError
from interbert.utils.hub_cache import local_pretrained
from interbert.modeling import (
    InterBertForImageTextRetrieval,
    InterBertForPreTraining,
    InterBertPreTrainedModel,
    _PairScorer,
)

# BERT layer sub-module names -> ours (our TransformerLayer is flat).
_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"^encoder\.(layer|v_layer)\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")


class ConversionError(UsageError):
    """A checkpoint or a setting that cannot be converted as asked (the CLI prints it as one line)."""


# --------------------------------------------------------------------------------------------------
# Loading state dicts from disk
# --------------------------------------------------------------------------------------------------
def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.npz`` (keys optionally under ``weight/``), or a
    ``.bin``/``.pt`` torch file (loaded with ``weights_only=True``: no code from the file is run)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 -- a damaged file is named, anything else re-raised
            from interbert.loading import unreadable_weights_reason

            reason = unreadable_weights_reason(e)
            if reason is None:
                raise
            raise ConversionError(f"{path}: {reason}") from e
    if path.suffix == ".npz":
        with np.load(path) as z:
            keys = [k for k in z.files if k.startswith("weight/")] or list(z.files)
            return {k.removeprefix("weight/"): torch.from_numpy(z[k].copy()) for k in keys}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code in it, or not a torch file
        raise ConversionError(f"{path}: cannot load as a weights-only torch state dict ({e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _bert_weights_file(bert_dir: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (bert_dir / name).exists():
            return bert_dir / name
    raise FileNotFoundError(f"{bert_dir}: no model.safetensors or pytorch_model.bin")


def _layer_param(bert_sub: str, leaf: str) -> str | None:
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)
    ours = _LAYER_NAMES.get(bert_sub)
    return None if ours is None else f"{ours}.{leaf}"


def _apply(model: torch.nn.Module, mapped: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``mapped`` into the model, checking every name and shape."""
    own = model.state_dict()
    for name, tensor in mapped.items():
        if name not in own:
            raise ConversionError(f"{source}: mapped weight {name!r} does not exist in {type(model).__name__}")
        if own[name].shape != tensor.shape:
            raise ConversionError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(mapped, strict=False)


# --------------------------------------------------------------------------------------------------
# BERT -> InterBERT
# --------------------------------------------------------------------------------------------------
def config_from_bert(bert_config: dict, base: InterBertConfig | str = "base", **overrides) -> InterBertConfig:
    """Text-path fields come from BERT's config; image-side fields from ``base`` (a preset or config).

    Unless given, BERT's depth is split evenly between the single-stream module and the text stream.
    """
    base_fields = dict(PRESETS[base]) if isinstance(base, str) else base.to_dict()
    depth = bert_config["num_hidden_layers"]
    fields = {
        **base_fields,
        "vocab_size": bert_config["vocab_size"],
        "hidden_size": bert_config["hidden_size"],
        "num_attention_heads": bert_config["num_attention_heads"],
        "intermediate_size": bert_config["intermediate_size"],
        "hidden_act": bert_config.get("hidden_act", "gelu"),
        "max_position_embeddings": bert_config["max_position_embeddings"],
        "type_vocab_size": bert_config.get("type_vocab_size", 2),
        "layer_norm_eps": bert_config.get("layer_norm_eps", 1e-12),
        "hidden_dropout_prob": bert_config.get("hidden_dropout_prob", 0.1),
        "attention_probs_dropout_prob": bert_config.get("attention_probs_dropout_prob", 0.1),
        "pad_token_id": bert_config.get("pad_token_id", 0),
        "num_single_stream_layers": depth - depth // 2,
        "num_text_stream_layers": depth // 2,
    }
    fields.update(overrides)
    if fields["hidden_size"] % fields["image_num_attention_heads"]:
        # keep the image head size a divisor of BERT's width (e.g. 384 with 8 heads would not split)
        fields["image_num_attention_heads"] = fields["num_attention_heads"]
    for key in ("model_type", "transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        fields.pop(key, None)
    config = InterBertConfig(**fields)
    if config.num_text_layers > depth:
        raise ConversionError(
            f"single-stream ({config.num_single_stream_layers}) + text-stream ({config.num_text_stream_layers}) "
            f"layers exceed BERT's depth of {depth}"
        )
    return config


def map_bert_state(bert_state: dict[str, torch.Tensor], config: InterBertConfig, model_class: type) -> dict[str, torch.Tensor]:
    """BERT names -> ours. BERT layers 0..S-1 fill the single stream, S..S+T-1 the text stream."""
    s, t = config.num_single_stream_layers, config.num_text_stream_layers
    prefix = "interbert."
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in bert_state.items():
        key = name.removeprefix("bert.")
        if key.endswith("position_ids") or key.endswith("token_type_ids"):
            continue  # buffers, not weights
        if key.startswith("embeddings."):
            key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
            mapped[prefix + key] = tensor
        elif m := _LAYER_RE.match(key):
            _, index, sub, leaf = m.groups()
            index, param = int(index), _layer_param(sub, leaf)
            if param is None:
                raise ConversionError(f"unknown BERT layer weight {name!r}")
            if index < s:
                mapped[f"{prefix}single_stream.{index}.{param}"] = tensor
            elif index < s + t:
                mapped[f"{prefix}text_stream.{index - s}.{param}"] = tensor
            # deeper BERT layers are not used by this configuration
        elif key.startswith("pooler.dense.") and model_class.__name__ == "InterBertForSequenceClassification":
            mapped["pooler." + key.removeprefix("pooler.dense.")] = tensor
        elif key.startswith("cls.predictions.") and model_class is InterBertForPreTraining:
            rest = key.removeprefix("cls.predictions.")
            if rest == "bias":
                mapped["msm_bias"] = tensor
            elif rest.startswith("transform."):
                mapped["msm_transform." + rest.removeprefix("transform.")] = tensor
            # decoder.weight is tied to the word embeddings; decoder.bias duplicates `bias`
    return mapped


def read_bert_config(bert_dir: Path) -> dict:
    config_file = bert_dir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{bert_dir}: not a BERT checkpoint folder (no config.json)")
    return json.loads(config_file.read_text())


def from_bert(
    bert_dir: str | Path,
    config: InterBertConfig | str = "base",
    model_class: type[InterBertPreTrainedModel] = InterBertForPreTraining,
    **overrides,
) -> InterBertPreTrainedModel:
    """Initialise InterBERT's text path from a transformers BERT checkpoint: a folder, or a Hub name
    (``bert-base-uncased``) already in the local Hugging Face cache (never downloaded).

    ``config``: a preset name or an :class:`InterBertConfig` supplying the image side; the text path's
    sizes always come from BERT. With no regions the text stream's output equals ``BertModel``'s.
    """
    bert_dir = local_pretrained(bert_dir)
    icfg = config_from_bert(read_bert_config(bert_dir), config, **overrides)
    model = model_class(icfg)
    mapped = map_bert_state(load_state_dict(_bert_weights_file(bert_dir)), icfg, model_class)
    _apply(model, mapped, str(bert_dir))
    return model


# --------------------------------------------------------------------------------------------------
# The authors' code -> ours
# --------------------------------------------------------------------------------------------------
def config_from_official(original: dict) -> InterBertConfig:
    """Translate the original code's config (its field names) into an :class:`InterBertConfig`."""
    if original.get("v_hidden_size", original["hidden_size"]) != original["hidden_size"]:
        raise ConversionError(
            "the original config has v_hidden_size != hidden_size; InterBERT's single stream needs one width"
        )
    predict_feature = bool(original.get("predict_feature", False))
    return InterBertConfig(
        vocab_size=original["vocab_size"],
        hidden_size=original["hidden_size"],
        num_attention_heads=original["num_attention_heads"],
        intermediate_size=original["intermediate_size"],
        num_single_stream_layers=original["num_hidden_layers"],
        num_text_stream_layers=original["t_num_hidden_layers"],
        num_image_stream_layers=original["v_num_hidden_layers"],
        image_num_attention_heads=original["v_num_attention_heads"],
        image_intermediate_size=original["v_intermediate_size"],
        region_feature_size=original["v_feature_size"],
        num_region_classes=1601 if predict_feature else original["v_target_size"],
        mrm_target="features" if predict_feature else "classes",  # the one decoder the checkpoint trained
        pooled_size=original["bi_hidden_size"],
        fusion=original.get("fusion_method", "mul"),
        hidden_act=original.get("hidden_act", "gelu"),
        hidden_dropout_prob=original.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=original.get("attention_probs_dropout_prob", 0.1),
        image_hidden_dropout_prob=original.get("v_hidden_dropout_prob", 0.1),
        image_attention_probs_dropout_prob=original.get("v_attention_probs_dropout_prob", 0.1),
        max_position_embeddings=original["max_position_embeddings"],
        type_vocab_size=original.get("type_vocab_size", 2),
        initializer_range=original.get("initializer_range", 0.02),
    )


def map_official_state(state: dict[str, torch.Tensor], original: dict) -> dict[str, torch.Tensor]:
    s = original["num_hidden_layers"]
    predict_feature = bool(original.get("predict_feature", False))
    direct = {
        "bert.v_embeddings.image_embeddings.": "interbert.region_embeddings.feature_projection.",
        "bert.v_embeddings.image_location_embeddings.": "interbert.region_embeddings.box_projection.",
        "bert.v_embeddings.LayerNorm.": "interbert.region_embeddings.LayerNorm.",
        "bert.embeddings.": "interbert.embeddings.",
        "bert.t_pooler.dense.": "interbert.text_pooler.dense.",
        "bert.v_pooler.dense.": "interbert.image_pooler.dense.",
        "cls.predictions.transform.": "msm_transform.",
        "cls.imagePredictions.transform.": "mrm_transform.",
        "cls.imagePredictions.decoder.": "mrm_feature_decoder." if predict_feature else "mrm_class_decoder.",
    }
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for name, tensor in state.items():
        name = name.removeprefix("module.").replace(".gamma", ".weight").replace(".beta", ".bias")
        if name == "cls.predictions.bias":
            mapped["msm_bias"] = tensor
        elif name == "cls.predictions.decoder.weight":
            word = state.get("bert.embeddings.word_embeddings.weight")
            if word is not None and not torch.equal(word, tensor):
                raise ConversionError("cls.predictions.decoder.weight differs from the word embeddings it is tied to")
        elif name.startswith("cls.bi_seq_relationship."):
            # original column 0 = "is next" (match); ours column 1 = match
            mapped["itm_classifier." + name.rsplit(".", 1)[1]] = tensor.flip(0)
        elif m := _LAYER_RE.match(name.removeprefix("bert.")) if name.startswith("bert.encoder.") else None:
            kind, index, sub, leaf = m.groups()
            index, param = int(index), _layer_param(sub, leaf)
            if param is None:
                unused.append(name)
            elif kind == "v_layer":
                mapped[f"interbert.image_stream.{index}.{param}"] = tensor
            elif index < s:
                mapped[f"interbert.single_stream.{index}.{param}"] = tensor
            else:
                mapped[f"interbert.text_stream.{index - s}.{param}"] = tensor
        else:
            for src, dst in direct.items():
                if name.startswith(src):
                    mapped[dst + name.removeprefix(src)] = tensor
                    break
            else:
                unused.append(name)
    if unused:
        raise ConversionError(f"original checkpoint weights with no place in InterBERT: {unused}")
    return mapped


def from_official(state_dict: dict[str, torch.Tensor], original_config: dict) -> InterBertForPreTraining:
    """Build our model from a checkpoint saved by the authors' code (returned in eval mode)."""
    model = InterBertForPreTraining(config_from_official(original_config))
    mapped = map_official_state(state_dict, original_config)
    _apply(model, mapped, "official checkpoint")
    return model.eval()


def retrieval_from_pretraining(
    model: InterBertForPreTraining, model_class: type[_PairScorer] = InterBertForImageTextRetrieval
) -> _PairScorer:
    """A pair scorer (retrieval, or VCR's ``InterBertForMultipleChoice``: the same weights) whose score
    starts as the pretraining ITM margin (logit[match] - logit[no match]), so fine-tuning starts from the
    zero-shot ranking instead of a random head."""
    scorer = model_class(model.config)
    scorer.interbert.load_state_dict(model.interbert.state_dict())
    w, b = model.itm_classifier.weight.data, model.itm_classifier.bias.data
    scorer.score.weight.data.copy_((w[1] - w[0])[None])
    scorer.score.bias.data.copy_((b[1] - b[0])[None])
    return scorer


if __name__ == "__main__":  # pragma: no cover
    from interbert.cli import main

    sys.exit(main(["convert", *sys.argv[1:]]))  # the commands live in interbert.convert_cli

__all__ = [
    "from_bert",
    "from_official",
    "config_from_bert",
    "config_from_official",
    "load_state_dict",
    "retrieval_from_pretraining",
    "ConversionError",
    "preset",
]
