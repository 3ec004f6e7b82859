"""The pieces of the data layer that search uses, shaped for it: a padded region batch for a list of
image ids, one display caption per image, and the model folder's tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from interbert.data import collate, open_features, prepare_regions
from interbert.data import read_captions as read_all_captions
from interbert.data.features import FeatureStore
from interbert.data.tokenize import load_tokenizer as load_wordpiece

__all__ = ["open_features", "region_batch", "first_captions", "load_tokenizer"]

REGION_KEYS = ("region_features", "region_boxes", "region_mask")


def region_batch(images: Sequence[tuple[FeatureStore, str]], max_regions: int) -> dict[str, torch.Tensor]:
    """``region_features``, ``region_boxes``, ``region_mask`` for (store, image id) pairs: the global
    region first, at most ``max_regions`` regions per image, padded to the batch's longest."""
    examples = [{**prepare_regions(store[i], max_regions), "image_id": i, "caption_id": None} for store, i in images]
    batch = collate(examples)
    return {key: batch[key] for key in REGION_KEYS}


def first_captions(path: str | Path, split: str | None = None) -> dict[str, str]:
    """One caption per image id (the first the file gives; only images of ``split`` when given), shown
    next to search results."""
    captions: dict[str, str] = {}
    for caption in read_all_captions(path):
        if split is None or caption.split == split:
            captions.setdefault(caption.image_id, caption.text)
    if split is not None and not captions:
        raise ValueError(f"{path}: no caption of split {split!r}")
    return captions


def load_tokenizer(model_dir: str | Path):
    model_dir = Path(model_dir)
    if not (model_dir / "vocab.txt").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer (vocab.txt or tokenizer.json); save one with the model")
    return load_wordpiece(model_dir)
