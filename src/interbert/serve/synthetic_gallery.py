"""A generated gallery for the search load benchmark (``benchmarks/serve_load.py``) and the tests: random
regions per image (``features``, ``boxes`` in pixels, ``image_w``, ``image_h``) and a randomly initialised
tiny model saved with a WordPiece vocabulary so the service can load it. The tests' folder writer
(``.npz`` files and PNGs) is ``tests/helpers/fixture_writers.py``: only tests use it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from interbert.config import preset
from interbert.modeling import InterBertForImageTextRetrieval, InterBertForPreTraining

ARCHITECTURES = {"retrieval": InterBertForImageTextRetrieval, "pretraining": InterBertForPreTraining}


def generated_regions(num_images: int, feature_dim: int, max_regions: int = 6, seed: int = 0, id_prefix: str = "img"):
    """Yield ``(image_id, Regions)``: 1..max_regions random boxes per image, ReLU-like random features."""
    from interbert.data import Regions

    rng = np.random.default_rng(seed)
    for n in range(num_images):
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        count = int(rng.integers(1, max_regions + 1))
        x1, y1 = rng.uniform(0, w * 0.6, count), rng.uniform(0, h * 0.6, count)
        x2, y2 = x1 + rng.uniform(10, w * 0.4, count), y1 + rng.uniform(10, h * 0.4, count)
        boxes = np.stack([x1, y1, np.minimum(x2, w), np.minimum(y2, h)], axis=1).astype(np.float32)
        features = np.maximum(rng.normal(size=(count, feature_dim)), 0).astype(np.float32)
        yield f"{id_prefix}{n:06d}", Regions(features, boxes, w, h)


def save_tiny_model(
    folder: str | Path,
    vocab_file: str | Path,
    feature_dim: int,
    architecture: str = "retrieval",
    seed: int = 0,
    **overrides,
) -> Path:
    """A randomly initialised small model in ``folder`` (``save_pretrained`` + ``vocab.txt``)."""
    import torch

    torch.manual_seed(seed)
    vocab_file = Path(vocab_file)
    vocab_size = sum(1 for _ in open(vocab_file, encoding="utf-8"))
    # One layer per stack keeps tests fast; pass e.g. num_single_stream_layers=2 for the tiny preset's depth.
    fields = dict(vocab_size=vocab_size, region_feature_size=feature_dim, num_region_classes=8,
                  num_single_stream_layers=1, num_text_stream_layers=1, num_image_stream_layers=1)
    config = preset("tiny", **{**fields, **overrides})
    model = ARCHITECTURES[architecture](config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    shutil.copyfile(vocab_file, folder / "vocab.txt")
    return folder
