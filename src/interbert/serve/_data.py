"""What the search service needs from the data layer: a feature store, model-ready regions, a padded
region batch, captions and the tokenizer.

Kept in one small module so that the index and the service speak to one seam; each function defers to
``interbert.data`` where that provides the piece and otherwise reads the per-image ``.npz`` layout
(``features`` N x D, ``boxes`` N x 4 in pixels, ``image_w``, ``image_h``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GLOBAL_BOX = (0.0, 0.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class ImageRegions:
    features: np.ndarray  # N x D float32
    boxes: np.ndarray  # N x 4, x1 y1 x2 y2 in pixels
    image_w: int
    image_h: int


class NpzFeatureStore(Mapping[str, ImageRegions]):
    """A folder of ``<image_id>.npz`` files; ``store[image_id]`` reads one image lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"feature store {self.path} is not a folder of <image_id>.npz files")
        self._ids = sorted(p.stem for p in self.path.glob("*.npz"))

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and (self.path / f"{image_id}.npz").is_file()

    def __getitem__(self, image_id: str) -> ImageRegions:
        file = self.path / f"{image_id}.npz"
        if "/" in image_id or "\\" in image_id or not file.is_file():
            raise KeyError(f"image id {image_id!r} is not in the feature store {self.path}")
        with np.load(file) as z:
            missing = {"features", "boxes", "image_w", "image_h"} - set(z.files)
            if missing:
                raise ValueError(f"{file}: missing arrays {sorted(missing)}")
            features, boxes = z["features"].astype(np.float32), z["boxes"].astype(np.float32)
            if features.ndim != 2 or boxes.shape != (features.shape[0], 4):
                raise ValueError(f"{file}: features {features.shape} and boxes {boxes.shape} do not match (N x D, N x 4)")
            return ImageRegions(features, boxes, int(z["image_w"]), int(z["image_h"]))


def open_features(path: str | Path) -> Mapping:
    try:
        from interbert.data.features import open_features as data_open_features
    except ImportError:
        return NpzFeatureStore(path)
    return data_open_features(path)


def prepare_regions(regions, max_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """(features, 5-d boxes) with the global region (mean of the kept regions) first, at most
    ``max_regions`` detector regions after it."""
    features = np.asarray(regions.features, dtype=np.float32)[:max_regions]
    boxes = np.asarray(regions.boxes, dtype=np.float32)[:max_regions]
    w, h = float(regions.image_w), float(regions.image_h)
    if len(features) == 0:
        raise ValueError("an image with no regions cannot be embedded")
    norm = np.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h], axis=1).clip(0.0, 1.0)
    area = (norm[:, 2] - norm[:, 0]) * (norm[:, 3] - norm[:, 1])
    boxes5 = np.concatenate([norm, area[:, None]], axis=1)
    features = np.concatenate([features.mean(axis=0, keepdims=True), features])
    boxes5 = np.concatenate([np.asarray([GLOBAL_BOX], dtype=np.float32), boxes5]).astype(np.float32)
    return features, boxes5


def collate_regions(items: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad (features, boxes) pairs to the longest: ``region_features``, ``region_boxes``, ``region_mask``."""
    longest = max(len(f) for f, _ in items)
    dim = items[0][0].shape[1]
    features = torch.zeros(len(items), longest, dim)
    boxes = torch.zeros(len(items), longest, 5)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for i, (f, b) in enumerate(items):
        features[i, : len(f)] = torch.from_numpy(f)
        boxes[i, : len(b)] = torch.from_numpy(b)
        mask[i, : len(f)] = 1
    return {"region_features": features, "region_boxes": boxes, "region_mask": mask}


def read_captions(path: str | Path) -> dict[str, str]:
    """One caption per image id (the first one a file gives), for display next to search results."""
    from interbert.data.captions import read_captions as data_read_captions

    captions: dict[str, str] = {}
    for caption in data_read_captions(path):
        captions.setdefault(caption.image_id, caption.text)
    return captions


def load_tokenizer(model_dir: str | Path):
    from transformers import BertTokenizerFast

    model_dir = Path(model_dir)
    if not (model_dir / "vocab.txt").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer (vocab.txt or tokenizer.json); save one with the model")
    return BertTokenizerFast.from_pretrained(str(model_dir))
