"""Negatives for image-text matching.

- :func:`tfidf_hard_negatives`: the paper's ITM-hn — for each caption the k most TF-IDF-similar captions
  of *other* images, computed once in chunks of sparse products and cached on disk by content hash.
- :func:`sample_itm_caption`: a pair is positive with p=0.5, else a hard negative (``hard_ratio``) or a
  random other image's caption.
- :func:`hard_ratio_at`: the hard share at a step of the run: fixed, or ramping linearly (random -> hard).
- :func:`image_hard_negatives`: nearest images by mean region feature (ViLBERT/InterBERT's hard pool for
  retrieval fine-tuning).
- :func:`sample_in_batch_negatives`: ALBEF's in-batch hard negatives, sampled from softmax(similarity).
- :func:`in_batch_itm_pairs`: which image of a batch of matched pairs each caption is paired with for ITM.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from interbert.utils.files import atomic_write

logger = logging.getLogger(__name__)


def _top_k_excluding_same(scores: np.ndarray, rows_codes: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best columns per row, never a column of the row's own image; ties broken by the
    lower index so the result is deterministic."""
    scores = np.where(rows_codes[:, None] == codes[None, :], -np.inf, scores)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -picked), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _image_codes(image_ids: Sequence[str]) -> np.ndarray:
    _, codes = np.unique(np.asarray([str(i) for i in image_ids]), return_inverse=True)
    return codes


def tfidf_hard_negatives(texts: Sequence[str], image_ids: Sequence[str], k: int = 10, chunk_size: int | None = None,
                         cache_dir: str | Path | None = None) -> np.ndarray:
    """``N x k`` caption indices: for caption i, the k captions of other images with the highest TF-IDF
    cosine similarity, most similar first. With ``cache_dir`` the result is stored as
    ``tfidf_hn_<hash>.npy`` keyed by the texts, ids and k, and reused."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(texts) != len(image_ids):
        raise ValueError(f"{len(texts)} texts but {len(image_ids)} image ids")
    codes = _image_codes(image_ids)
    n_images = codes.max() + 1 if len(codes) else 0
    if n_images < 2:
        raise ValueError("hard negatives need captions of at least two images")
    k = min(k, int(len(codes) - np.bincount(codes).max()))  # every row must have k other-image captions
    cache = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        for text, image_id in zip(texts, image_ids):
            digest.update(f"{image_id}\x1f{text}\x1e".encode())
        digest.update(f"k={k}".encode())
        cache = Path(cache_dir) / f"tfidf_hn_{digest.hexdigest()[:20]}.npy"
        if cache.exists():
            return np.load(cache)

    matrix = TfidfVectorizer().fit_transform(texts).astype(np.float32).tocsr()  # rows L2-normalised: dot = cosine
    chunk_size = chunk_size or max(1, 20_000_000 // max(1, len(texts)))  # ~80 MB of dense scores per chunk
    out = np.empty((len(texts), k), dtype=np.int64)
    transposed = matrix.T.tocsc()
    for start in range(0, len(texts), chunk_size):
        rows = slice(start, start + chunk_size)
        scores = (matrix[rows] @ transposed).toarray()
        out[rows] = _top_k_excluding_same(scores, codes[rows], codes, k)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # A handle, not a name: np.save would append ".npy" to the temporary's name.
        atomic_write(cache, lambda handle: np.save(handle, out))
    return out


def hard_ratio_at(step: int, total_steps: int, end: float, start: float | None = None) -> float:
    """The share of negatives that are hard at optimisation ``step`` (0-based) of ``total_steps``: ``end``
    throughout when ``start`` is None, else linear from ``start`` at step 0 to ``end`` at the last step
    (``start + (end - start) * min(1, step / (total_steps - 1))``), e.g. 0 -> 1: random negatives
    first, while the matching head cannot yet tell hard ones apart, TF-IDF-similar ones at the end."""
    if start is None:
        return end
    fraction = min(1.0, max(0, step) / max(1, total_steps - 1))
    return start + (end - start) * fraction


def sample_itm_caption(index: int, rng: np.random.Generator, image_codes: np.ndarray,
                       hard_negatives: np.ndarray | None = None, hard_ratio: float = 1.0,
                       p_positive: float = 0.5) -> tuple[int, int]:
    """Which caption to pair with caption ``index``'s image: returns ``(caption_index, itm_label)``."""
    if rng.random() < p_positive:
        return index, 1
    if hard_negatives is not None and rng.random() < hard_ratio:
        return int(hard_negatives[index][rng.integers(0, hard_negatives.shape[1])]), 0
    return random_other_image_caption(index, rng, image_codes), 0


def random_other_image_caption(index: int, rng: np.random.Generator, image_codes: np.ndarray) -> int:
    """A uniformly drawn caption whose image differs from caption ``index``'s."""
    for _ in range(100):
        j = int(rng.integers(0, len(image_codes)))
        if image_codes[j] != image_codes[index]:
            return j
    others = np.flatnonzero(image_codes != image_codes[index])  # nearly all captions share one image
    if not len(others):
        raise ValueError("every caption belongs to the same image: no negative exists")
    return int(rng.choice(others))


def mean_region_features(store, image_ids: Sequence[str]) -> np.ndarray:
    """One L2-normalised mean feature per image (streamed from the store, one image at a time)."""
    means = np.stack([store[i].features.mean(0) for i in image_ids]).astype(np.float32)
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def image_hard_negatives(means: np.ndarray, k: int = 100, chunk_size: int = 4096) -> np.ndarray:
    """``M x k`` image indices: the k nearest other images by cosine of mean region features."""
    k = min(k, len(means) - 1)
    codes = np.arange(len(means))
    out = np.empty((len(means), k), dtype=np.int64)
    for start in range(0, len(means), chunk_size):
        rows = slice(start, start + chunk_size)
        out[rows] = _top_k_excluding_same(means[rows] @ means.T, codes[rows], codes, k)
    return out


def sample_in_batch_negatives(similarity: torch.Tensor, same_image: torch.Tensor | None = None,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """ALBEF-style: for row i of a B x B similarity (texts x images, or the reverse) draw one column
    j != i with probability softmax(similarity[i]) over the allowed columns. ``same_image`` (B x B bool)
    forbids further columns, e.g. other captions of the same image."""
    forbidden = _forbidden(similarity, same_image)
    if forbidden.all(dim=1).any():
        raise ValueError("a row has no allowed negative (every column is forbidden)")
    return _draw(similarity, forbidden, generator)


def in_batch_itm_pairs(similarity: torch.Tensor, same_image: torch.Tensor | None = None, negative_ratio: float = 0.5,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For a batch of B matched (caption, image) pairs with a B x B caption-image ``similarity``: each
    caption keeps its image, or (with probability ``negative_ratio``) is paired with another image of the
    batch drawn as in :func:`sample_in_batch_negatives`. Returns ``(image_order, itm_labels)``: caption i
    is paired with image ``image_order[i]``; ``itm_labels[i]`` is 1 when that is its own image. A caption
    whose every other image is the same picture (``same_image``) keeps its own."""
    forbidden = _forbidden(similarity, same_image)
    draw = torch.rand(len(similarity), generator=generator, device=similarity.device) < negative_ratio
    negative = draw & ~forbidden.all(dim=1)
    order = torch.arange(len(similarity), device=similarity.device)
    rows = negative.nonzero().squeeze(1)
    if len(rows):
        order[rows] = _draw(similarity[rows], forbidden[rows], generator)
    return order, (~negative).long()


def _forbidden(similarity: torch.Tensor, same_image: torch.Tensor | None) -> torch.Tensor:
    forbidden = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    return forbidden if same_image is None else forbidden | same_image.to(similarity.device).bool()


def _draw(similarity: torch.Tensor, forbidden: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    weights = torch.softmax(similarity.float().masked_fill(forbidden, float("-inf")), dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)
