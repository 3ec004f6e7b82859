"""Masked group modeling: pure functions of their inputs and a ``numpy.random.Generator``.

Text (MSM). Positions are chosen in *units*: tokens, or whole words when ``word_ids`` are given (so a
span never cuts a word, and a Chinese word from jieba is masked as a whole). ``maskable`` marks the
real caption tokens ([CLS], [SEP] and padding excluded).

- :func:`single_span_mask`: the original's one contiguous span per caption — start uniform over the
  units, length uniform in [1, len] (clipped at the caption's end).
- :func:`geometric_span_mask`: SpanBERT's spans, lengths ~ Geometric(0.2) clipped at 10, until ~15%.
- :func:`token_mask`: BERT's per-token (or per-word) 15%, the ablation.
- :func:`apply_token_masking`: 80% [MASK] / 10% random / 10% kept, and the ``-100``-elsewhere labels.

Regions (MRM). :func:`mask_region_groups` makes each real region an anchor with probability 0.1 and masks
every region whose IoU with an anchor is >= 0.4 (the anchor included), never the global position 0.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
NO_POSITION = -1  # the padding of a batch's msm_positions (interbert.data.batches.masked_positions)
IOU_GROUP_THRESHOLD = 0.4  # the original's: an anchor masks every region overlapping it this much


def _units(maskable: np.ndarray, word_ids: np.ndarray | list | None) -> list[np.ndarray]:
    """Maskable positions grouped into units (one per token, or one per word id), in order."""
    positions = np.flatnonzero(maskable)
    if word_ids is None:
        return [positions[i : i + 1] for i in range(len(positions))]
    units: dict[int, list[int]] = {}
    for p in positions:
        if word_ids[p] is None:
            raise ValueError(f"maskable position {p} has no word id")
        units.setdefault(int(word_ids[p]), []).append(p)
    return [np.asarray(v) for v in units.values()]


def _expand(units: list[np.ndarray], chosen, length: int) -> np.ndarray:
    mask = np.zeros(length, dtype=bool)
    for u in chosen:
        mask[units[u]] = True
    return mask


def single_span_mask(maskable: np.ndarray, rng: np.random.Generator, word_ids=None) -> np.ndarray:
    """One contiguous span: start uniform in [0, n), length uniform in [1, n], cut at the end."""
    units = _units(np.asarray(maskable, bool), word_ids)
    n = len(units)
    if n == 0:
        return np.zeros(len(maskable), dtype=bool)
    start, length = rng.integers(0, n), rng.integers(1, n + 1)
    return _expand(units, range(start, min(n, start + length)), len(maskable))


def geometric_span_mask(maskable: np.ndarray, rng: np.random.Generator, word_ids=None, mask_ratio: float = 0.15,
                        p: float = 0.2, max_span: int = 10) -> np.ndarray:
    """SpanBERT-style: draw span lengths ~ Geometric(p) (clipped at ``max_span``) and uniform starts until
    ``mask_ratio`` of the units (at least one) are masked."""
    units = _units(np.asarray(maskable, bool), word_ids)
    n = len(units)
    if n == 0:
        return np.zeros(len(maskable), dtype=bool)
    budget = max(1, round(mask_ratio * n))
    chosen = np.zeros(n, dtype=bool)
    for _ in range(100 * budget):  # bounded: a long span near the budget is redrawn, not forced
        if chosen.sum() >= budget:
            break
        length = min(int(rng.geometric(p)), max_span, budget - int(chosen.sum()))
        start = rng.integers(0, n - length + 1)
        chosen[start : start + length] = True
    return _expand(units, np.flatnonzero(chosen), len(maskable))


def token_mask(maskable: np.ndarray, rng: np.random.Generator, word_ids=None, mask_ratio: float = 0.15) -> np.ndarray:
    """BERT's MLM selection: ``mask_ratio`` of the units (at least one), chosen uniformly."""
    units = _units(np.asarray(maskable, bool), word_ids)
    if not units:
        return np.zeros(len(maskable), dtype=bool)
    k = max(1, round(mask_ratio * len(units)))
    return _expand(units, rng.choice(len(units), size=k, replace=False), len(maskable))


TEXT_MASKERS = {"span": single_span_mask, "geometric": geometric_span_mask, "token": token_mask}


def apply_token_masking(input_ids: np.ndarray, mask: np.ndarray, rng: np.random.Generator, mask_token_id: int,
                        vocab_size: int, mask_prob: float = 0.8, random_prob: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(masked_ids, labels)``: at masked positions 80% become [MASK], 10% a random token, 10%
    stay; labels hold the original id there and -100 elsewhere."""
    input_ids = np.asarray(input_ids)
    labels = np.where(mask, input_ids, IGNORE_INDEX)
    draw = rng.random(len(input_ids))
    masked = input_ids.copy()
    masked[mask & (draw < mask_prob)] = mask_token_id
    replace = mask & (draw >= mask_prob) & (draw < mask_prob + random_prob)
    masked[replace] = rng.integers(0, vocab_size, size=int(replace.sum()))
    return masked, labels


def region_iou(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``x1 y1 x2 y2`` boxes (N x 4, or N x 5 with the area fraction last)."""
    b = np.asarray(boxes, dtype=np.float64)[:, :4]
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    w = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area[:, None] + area[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def mask_region_groups(boxes: np.ndarray, real_mask: np.ndarray, rng: np.random.Generator, p_anchor: float = 0.1,
                       iou_threshold: float = IOU_GROUP_THRESHOLD, overlaps: np.ndarray | None = None) -> np.ndarray:
    """InterBERT's masked group modeling for regions: bool mask of the regions to zero. Position 0 (the
    global region) is never an anchor nor masked; padding never is. ``overlaps``: the boxes'
    ``region_iou(boxes) >= iou_threshold``, when the caller keeps it per image (it depends on the boxes
    only, and computing it was most of this function's cost)."""
    real = np.asarray(real_mask, bool).copy()
    real[0] = False
    anchors = real & (rng.random(len(real)) < p_anchor)
    if not anchors.any():
        return np.zeros(len(real), dtype=bool)
    if overlaps is None:
        return (region_iou(boxes)[anchors] >= iou_threshold).any(axis=0) & real
    return overlaps[anchors].any(axis=0) & real


def mask_regions_independently(real_mask: np.ndarray, rng: np.random.Generator, p: float = 0.15) -> np.ndarray:
    """The ablation: each real region (not the global one) masked on its own with probability ``p``."""
    real = np.asarray(real_mask, bool).copy()
    real[0] = False
    return real & (rng.random(len(real)) < p)


def apply_region_masking(features: np.ndarray, mask: np.ndarray,
                         class_probs: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Zero the masked regions' features; the targets are the detector's class distributions when the
    store has them (KL), else the original features (regression). Targets cover every region; the
    loss reads them only where ``mrm_mask`` is set."""
    masked = np.where(np.asarray(mask, bool)[:, None], 0.0, features).astype(np.float32)
    targets = {"mrm_mask": np.asarray(mask, bool)}
    if class_probs is not None:
        targets["mrm_class_targets"] = np.asarray(class_probs, np.float32)
    else:
        targets["mrm_feature_targets"] = np.asarray(features, np.float32)
    return masked, targets
