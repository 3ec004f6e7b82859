"""Evaluation metrics: retrieval ranks and recalls from a caption x image score matrix.

Image retrieval (what ViLBERT and InterBERT report): each caption is a query over all images; its
rank is the 1-based position of its own image. Text retrieval (what UNITER adds): each image is a
query over all captions; its rank is the position of the best-placed of its own captions.

Ties count against the model: a true item's rank is 1 + the number of *wrong* items scored at least
as high. A scorer that gives every pair the same score therefore gets the worst rank everywhere (and
recall 0 at every K below the number of candidates) rather than a perfect score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _check_inputs(scores: np.ndarray, caption_image_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    caption_image_index = np.asarray(caption_image_index)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty captions x images matrix, got shape {scores.shape}")
    num_captions, num_images = scores.shape
    if caption_image_index.shape != (num_captions,):
        raise ValueError(
            f"caption_image_index must hold one image index per caption ({num_captions}), "
            f"got shape {caption_image_index.shape}"
        )
    if not np.issubdtype(caption_image_index.dtype, np.integer):
        raise ValueError(f"caption_image_index must hold integers, got {caption_image_index.dtype}")
    out_of_range = np.flatnonzero((caption_image_index < 0) | (caption_image_index >= num_images))
    if out_of_range.size:
        first = out_of_range[0]
        raise ValueError(
            f"caption {first} points at image {caption_image_index[first]}, outside 0..{num_images - 1} "
            f"({out_of_range.size} caption(s) out of range)"
        )
    not_finite = np.argwhere(~np.isfinite(scores))
    if not_finite.size:
        caption, image = not_finite[0]
        raise ValueError(
            f"score of caption {caption} x image {image} is {scores[caption, image]} ({len(not_finite)} non-finite)"
        )
    return scores, caption_image_index


def image_retrieval_ranks(scores: np.ndarray, caption_image_index: np.ndarray) -> np.ndarray:
    """1-based rank of each caption's own image among all images (ties count against the model)."""
    scores, caption_image_index = _check_inputs(scores, caption_image_index)
    true_scores = scores[np.arange(len(scores)), caption_image_index]
    # ">=" counts the true image itself once, which is the "1 +" of the rank
    return (scores >= true_scores[:, None]).sum(axis=1)


def text_retrieval_ranks(scores: np.ndarray, caption_image_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each image with at least one caption: 1-based rank of its best-placed caption among all captions.

    Returns ``(ranks, image_indices)``: images without a caption cannot be text queries and are not
    in ``image_indices`` (they still take part in image retrieval as distractors).
    """
    scores, caption_image_index = _check_inputs(scores, caption_image_index)
    is_true = np.zeros(scores.shape, dtype=bool)
    is_true[np.arange(len(scores)), caption_image_index] = True
    image_indices = np.flatnonzero(is_true.any(axis=0))
    scores, is_true = scores[:, image_indices], is_true[:, image_indices]
    best_true = np.where(is_true, scores, -np.inf).max(axis=0)
    wrong_at_least_as_high = ((scores >= best_true[None, :]) & ~is_true).sum(axis=0)
    return 1 + wrong_at_least_as_high, image_indices


def rank_summary(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent, median and mean rank."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no ranks to summarise")
    summary = {f"R@{k}": 100.0 * float(np.mean(ranks <= k)) for k in ks}
    summary["median_rank"] = float(np.median(ranks))
    summary["mean_rank"] = float(np.mean(ranks))
    summary["num_queries"] = int(ranks.size)
    return summary


def retrieval_metrics(
    scores: np.ndarray, caption_image_index: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """Image and text retrieval metrics of a captions x images score matrix (higher = better match).

    ``caption_image_index[c]`` is the column of caption c's image. Returns (recalls in percent)::

        {"image_retrieval": {"R@1", "R@5", "R@10", "median_rank", "mean_rank", "num_queries"},
         "text_retrieval": {... same keys, one query per image with a caption},
         "rsum": sum of the 2 x len(ks) recalls, "mean_recall": their mean,
         "num_captions", "num_images"}
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    image_ranks = image_retrieval_ranks(scores, caption_image_index)
    text_ranks, _ = text_retrieval_ranks(scores, caption_image_index)
    image_retrieval = rank_summary(image_ranks, ks)
    text_retrieval = rank_summary(text_ranks, ks)
    recalls = [summary[f"R@{k}"] for summary in (image_retrieval, text_retrieval) for k in ks]
    return {
        "image_retrieval": image_retrieval,
        "text_retrieval": text_retrieval,
        "rsum": float(sum(recalls)),
        "mean_recall": float(np.mean(recalls)),
        "num_captions": int(np.shape(scores)[0]),
        "num_images": int(np.shape(scores)[1]),
    }


def write_rank_histogram(
    ranks: Mapping[str, np.ndarray] | np.ndarray,
    path: str | Path,
    num_candidates: int | None = None,
    title: str = "Rank of the true image",
) -> Path:
    """Save a histogram of 1-based ranks (one series per name, e.g. per model) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    series = dict(ranks) if isinstance(ranks, Mapping) else {"ranks": ranks}
    if not series or any(np.asarray(r).size == 0 for r in series.values()):
        raise ValueError("write_rank_histogram needs at least one non-empty series of ranks")
    highest = num_candidates or max(int(np.max(r)) for r in series.values())
    bins = np.unique(np.geomspace(1, highest + 1, num=min(40, highest + 1)).astype(int))
    if len(bins) < 2:
        bins = np.array([1, 2])
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        axes.hist(np.asarray(values), bins=bins, histtype="step", linewidth=1.5, label=name)
    axes.set_xscale("log")
    axes.set_xlabel("rank (1 = best, log scale)")
    axes.set_ylabel("queries")
    axes.set_title(title)
    if len(series) > 1:
        axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
