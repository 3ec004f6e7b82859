"""``interbert data check``: can these captions and features train together?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from interbert.data.captions import Caption
from interbert.data.features import FeatureStore

BOX_TOLERANCE_PX = 1.0  # detectors round boxes; a pixel outside the image is normal


@dataclass
class DataReport:
    num_captions: int = 0
    num_caption_images: int = 0
    num_feature_images: int = 0
    feature_dim: int = 0
    caption_image_ids_with_features: list[str] = field(default_factory=list)  # the trainable images
    captions_without_features: list[str] = field(default_factory=list)  # image ids
    features_without_captions: list[str] = field(default_factory=list)
    images_with_boxes_outside: list[str] = field(default_factory=list)
    images_with_inverted_boxes: list[str] = field(default_factory=list)
    images_with_nonfinite_values: list[str] = field(default_factory=list)
    images_without_regions: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        """Problems that stop training (warnings such as unmatched ids only shrink the data)."""
        errors = []
        if not set(self.caption_image_ids_with_features):
            errors.append("no image has both captions and features (do the ids match?)")
        for name in ("images_with_nonfinite_values", "images_without_regions", "images_with_inverted_boxes"):
            ids = getattr(self, name)
            if ids:
                errors.append(f"{len(ids)} {name.replace('_', ' ')} (e.g. {ids[:5]})")
        return errors

    def lines(self) -> list[str]:
        out = [f"captions: {self.num_captions} for {self.num_caption_images} images",
               f"feature store: {self.num_feature_images} images, feature dim {self.feature_dim}",
               f"trainable images (captions and features): {len(self.caption_image_ids_with_features)}"]
        for name in ("captions_without_features", "features_without_captions", "images_with_boxes_outside"):
            ids = getattr(self, name)
            if ids:
                out.append(f"warning: {len(ids)} {name.replace('_', ' ')} (e.g. {ids[:5]})")
        out += [f"error: {e}" for e in self.errors]
        out.append("OK: the data can train" if not self.errors else "FAILED: the data cannot train as it is")
        return out


def check_data(captions: Sequence[Caption], store: FeatureStore, progress: bool = False) -> DataReport:
    """Read every image of the store once and report what would go wrong in training."""
    from tqdm.auto import tqdm

    caption_ids = sorted({c.image_id for c in captions})
    feature_ids = store.ids()
    feature_set, caption_set = set(feature_ids), set(caption_ids)
    report = DataReport(num_captions=len(captions), num_caption_images=len(caption_ids),
                        num_feature_images=len(feature_ids), feature_dim=store.feature_dim,
                        captions_without_features=[i for i in caption_ids if i not in feature_set],
                        features_without_captions=[i for i in feature_ids if i not in caption_set],
                        caption_image_ids_with_features=[i for i in caption_ids if i in feature_set])
    for image_id in tqdm(feature_ids, desc="checking features", unit="img", disable=not progress):
        r = store[image_id]
        if r.num_regions == 0:
            report.images_without_regions.append(image_id)
            continue
        if not (np.isfinite(r.features).all() and np.isfinite(r.boxes).all()):
            report.images_with_nonfinite_values.append(image_id)
            continue
        b, t = r.boxes, BOX_TOLERANCE_PX
        if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
            report.images_with_inverted_boxes.append(image_id)
        if (b[:, :2] < -t).any() or (b[:, 2] > r.image_w + t).any() or (b[:, 3] > r.image_h + t).any():
            report.images_with_boxes_outside.append(image_id)
    return report
