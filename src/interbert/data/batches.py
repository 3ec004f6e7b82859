"""From captions and regions to the model's batches (the contract in ``docs/interfaces.md``).

:func:`prepare_regions` puts the global region first and turns boxes into the 5-d form; the datasets
build one example (a dict of arrays) per caption; :func:`collate` pads a list of examples to the batch's
longest text and region list (masks: 1 = keep). Randomness comes from a generator seeded by
``(seed, epoch, index)``, so an example is the same whichever DataLoader worker builds it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from interbert.data import META
from interbert.data.captions import Caption
from interbert.data.features import FeatureStore, Regions
from interbert.data.masking import (
    IGNORE_INDEX,
    IOU_GROUP_THRESHOLD,
    NO_POSITION,
    TEXT_MASKERS,
    apply_region_masking,
    apply_token_masking,
    mask_region_groups,
    mask_regions_independently,
    region_iou,
)
from interbert.data.negatives import (
    hard_ratio_at,
    image_hard_negatives,
    mean_region_features,
    random_other_image_caption,
    sample_itm_caption,
    tfidf_hard_negatives,
)
from interbert.data.tokenize import encode_captions
from interbert.errors import DataError

logger = logging.getLogger(__name__)

GLOBAL_BOX = np.array([0.0, 0.0, 1.0, 1.0, 1.0], dtype=np.float32)
# pretraining: every objective in every step (joint), or one task a step in turn (UNITER-style alternation)
TASK_SAMPLING = ("joint", "alternate")


def prepare_regions(regions: Regions, max_regions: int = 36) -> dict[str, np.ndarray | None]:
    """``region_features`` (R x D), ``region_boxes`` (R x 5) and ``class_probs`` (R x C or None) with
    R <= ``max_regions``: the global region (mean of the kept regions' features, box 0,0,1,1, area 1)
    then the first ``max_regions - 1`` detector regions (detectors emit them by confidence)."""
    keep = max(0, max_regions - 1)
    features = regions.features[:keep].astype(np.float32)
    boxes = regions.boxes[:keep].astype(np.float32)
    w, h = float(regions.image_w), float(regions.image_h)
    # clip: detectors leave boxes a pixel or so outside the image; the 5-d form is meant to be in [0, 1]
    norm = np.clip(boxes / np.array([w, h, w, h], dtype=np.float32), 0.0, 1.0)
    area = (norm[:, 2] - norm[:, 0]) * (norm[:, 3] - norm[:, 1])
    global_feature = features.mean(0, keepdims=True) if len(features) else np.zeros((1, regions.features.shape[1]), np.float32)
    out = {
        "region_features": np.concatenate([global_feature, features]),
        "region_boxes": np.concatenate([GLOBAL_BOX[None], np.concatenate([norm, area[:, None]], 1)]).astype(np.float32),
        "class_probs": None,
    }
    if regions.class_probs is not None:
        probs = regions.class_probs[:keep].astype(np.float32)
        out["class_probs"] = np.concatenate([probs.mean(0, keepdims=True), probs])
    return out


def _pad(arrays: Sequence[np.ndarray], length: int, value) -> torch.Tensor:
    first = np.asarray(arrays[0])
    out = np.full((len(arrays), length, *first.shape[1:]), value, dtype=first.dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out)


# Length buckets (static shapes for a compiled step): at most this many edges, each a multiple of this.
MAX_BUCKETS = 4
BUCKET_MULTIPLE = 8


def bucket_edges(lengths: Sequence[int], max_buckets: int = MAX_BUCKETS, multiple: int = BUCKET_MULTIPLE) -> list[int]:
    """Bucket edges chosen from a length histogram (``data.length_buckets: auto``): the 1/n, 2/n, ..., n/n
    quantiles of ``lengths``, each rounded up to a multiple of ``multiple`` (tensor shapes kernels like) but
    never above the longest length, so the last edge is exactly the longest and every batch fits a bucket.
    Duplicates collapse, so a narrow histogram gives fewer edges. A compiled step then sees at most
    ``max_buckets`` shapes per padded dimension instead of one per batch maximum."""
    if not len(lengths):
        raise ValueError("bucket_edges needs at least one length")
    values = np.asarray(lengths)
    if values.min() < 1 or max_buckets < 1 or multiple < 1:
        raise ValueError(f"lengths, max_buckets and multiple must be >= 1 (got min length {values.min()}, "
                         f"max_buckets {max_buckets}, multiple {multiple})")
    longest = int(values.max())
    quantiles = np.quantile(values, np.arange(1, max_buckets + 1) / max_buckets, method="higher")
    edges = {min(longest, -(-int(q) // multiple) * multiple) for q in quantiles}
    return sorted(edges | {longest})


def bucket_length(longest: int, edges: Sequence[int] | None) -> int:
    """The length a batch whose longest item is ``longest`` is padded to: the smallest edge that fits it;
    without edges (or longer than every edge, which ``auto`` edges never are) the longest itself."""
    if edges:
        for edge in edges:
            if edge >= longest:
                return int(edge)
    return longest


# Masked-position budgets (static shapes for the MSM head): the share of batches of a text bucket that its
# typical budget holds (the rest take the full B x T).
BUDGET_QUANTILE = 0.99


def masked_count_budgets(lengths: Sequence[int], masked_counts: Sequence[int], batch_size: int,
                         text_edges: Sequence[int], quantile: float = BUDGET_QUANTILE, multiple: int = BUCKET_MULTIPLE,
                         draws: int = 4000, seed: int = 0) -> dict[int, int]:
    """The typical masked-token budget of each text bucket (``{edge: budget}``), from the data's
    masked-count histogram: ``lengths[i]`` / ``masked_counts[i]`` are one caption's tokens and masked tokens
    (a sample of the masking, :meth:`PretrainingDataset.masked_token_counts`).

    A per-caption budget cannot be tight (the original's span masks up to the whole caption), a per-batch one
    can: ``draws`` batches of ``batch_size`` captions drawn at random (as the loop's shuffled batches are),
    each in the bucket of its longest caption, and per bucket the ``quantile`` of their masked totals, rounded
    up to a multiple of ``multiple`` and never above B x T. A bucket with fewer than 100 drawn batches (too few
    for a 99th percentile) takes the quantile of all batches (longer captions mask more, so that is an upper
    estimate). A batch above its budget takes the full B x T (:func:`masked_positions`): at most two budgets per
    text bucket, so a compiled step sees at most twice the bucket shapes, and the second only for the rare batch."""
    lengths, counts = np.asarray(lengths), np.asarray(masked_counts)
    if not len(lengths) or len(lengths) != len(counts) or batch_size < 1:
        raise ValueError(f"masked_count_budgets needs as many masked counts as lengths (got {len(lengths)} and "
                         f"{len(counts)}) and batch_size >= 1 (got {batch_size})")
    picks = np.random.default_rng(seed).integers(0, len(lengths), (draws, batch_size))
    buckets = np.array([bucket_length(int(n), text_edges) for n in lengths[picks].max(1)])
    totals = counts[picks].sum(1)
    budgets = {}
    for edge in text_edges:
        here = totals[buckets == edge]
        typical = np.quantile(here if len(here) >= 100 else totals, quantile, method="higher")
        budgets[int(edge)] = min(batch_size * int(edge), -(-int(typical) // multiple) * multiple)
    return budgets


def masked_positions(msm_labels: torch.Tensor, budgets: Mapping[int, int]) -> torch.Tensor:
    """``msm_positions``: the flat indices (row-major over B x T) of the masked tokens of ``msm_labels``,
    padded with :data:`~interbert.data.masking.NO_POSITION` up to the batch's budget: the typical budget of its
    text length (:func:`masked_count_budgets`, at most B x T), or B x T when more tokens are masked than that (or
    the length has no budget). The MSM head of the static-shape mode runs on these rows only, a fixed number per bucket."""
    b, t = msm_labels.shape
    flat = (msm_labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    typical = min(budgets.get(t, b * t), b * t)
    size = typical if len(flat) <= typical else b * t
    return torch.cat([flat, flat.new_full((size - len(flat),), NO_POSITION)])


def collate(examples: Sequence[dict] | Sequence[Sequence[dict]], pad_token_id: int = 0,
            length_buckets: Sequence[int] | None = None, region_buckets: Sequence[int] | None = None,
            msm_budgets: Mapping[int, int] | None = None) -> dict:
    """Pad examples to the batch's longest text and region list, or with ``length_buckets`` /
    ``region_buckets`` (ascending edges, :func:`bucket_edges`) up to the smallest edge that fits them: the
    masks mark the pad, which no attention reads and no loss scores, so the results are those of the
    unbucketed batch. Examples that are groups (lists of dicts, the 4-way retrieval groups) are flattened to
    ``groups x size`` pairs and ``group_size`` is set. ``msm_budgets`` (``{text length: budget}``,
    :func:`masked_count_budgets`): a batch with ``msm_labels`` also gets ``msm_positions`` (:func:`masked_positions`),
    which the model's static-shape mode reads."""
    group_size = None
    if isinstance(examples[0], (list, tuple)):
        group_size = len(examples[0])
        examples = [pair for group in examples for pair in group]
    batch: dict = {}
    if "input_ids" in examples[0]:
        lengths = [len(e["input_ids"]) for e in examples]
        longest = bucket_length(max(lengths), length_buckets)
        batch["input_ids"] = _pad([e["input_ids"] for e in examples], longest, pad_token_id).long()
        batch["attention_mask"] = (torch.arange(longest)[None] < torch.tensor(lengths)[:, None]).long()
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        if "msm_labels" in examples[0]:
            batch["msm_labels"] = _pad([e["msm_labels"] for e in examples], longest, IGNORE_INDEX).long()
            if msm_budgets is not None:
                batch["msm_positions"] = masked_positions(batch["msm_labels"], msm_budgets)
    if "region_features" in examples[0]:
        counts = [len(e["region_features"]) for e in examples]
        most = bucket_length(max(counts), region_buckets)
        batch["region_features"] = _pad([e["region_features"] for e in examples], most, 0.0).float()
        batch["region_boxes"] = _pad([e["region_boxes"] for e in examples], most, 0.0).float()
        batch["region_mask"] = (torch.arange(most)[None] < torch.tensor(counts)[:, None]).long()
        if "mrm_mask" in examples[0]:
            batch["mrm_mask"] = _pad([e["mrm_mask"] for e in examples], most, False).bool()
        for key in ("mrm_class_targets", "mrm_feature_targets"):
            if key in examples[0]:
                batch[key] = _pad([e[key] for e in examples], most, 0.0).float()
    if "itm_labels" in examples[0]:
        batch["itm_labels"] = torch.tensor([int(e["itm_labels"]) for e in examples], dtype=torch.long)
        # which rows show the same picture (equal values): in-batch negatives never pair those
        _, codes = np.unique(np.asarray([str(e["image_id"]) for e in examples]), return_inverse=True)
        batch["image_index"] = torch.as_tensor(codes.reshape(-1), dtype=torch.long)
    batch[META] = {"image_ids": [e["image_id"] for e in examples], "caption_ids": [e["caption_id"] for e in examples]}
    if group_size is not None:
        batch["group_size"] = group_size
    return batch


def captions_with_features(captions: Sequence[Caption], store: FeatureStore) -> list[Caption]:
    """The captions whose image is in the store; the others are counted and reported, not hidden."""
    kept = [c for c in captions if c.image_id in store]
    if len(kept) < len(captions):
        missing = sorted({c.image_id for c in captions if c.image_id not in store})
        logger.warning("skipping %d of %d captions: %d images have no features in %s (e.g. %s)",
                       len(captions) - len(kept), len(captions), len(missing), store.path, missing[:5])
    if not kept:
        raise DataError(f"no caption has features in {store.path}: check that the image ids match "
                        "(`interbert data check`)")
    return kept


# Share of the memory available at start-up that region_cache="auto" may fill.
AUTO_CACHE_MEMORY_SHARE = 0.25


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no estimate, no auto cache
        return None


class RegionCache:
    """Every image's :func:`prepare_regions` output, made once, for a training run that reads each image
    many times (an epoch reads an image once per caption, more with negatives and 4-way groups).

    Without it a step decodes base64 (TSV), unzips (npz) or copies (store) every image of the batch
    again, and recomputes the IoU groups of the masking: on the tiny preset that was a fifth of the
    step. The arrays are filled in the main process, before DataLoader workers fork, so the workers
    share them instead of each building its own. They are read-only: examples are built from copies.
    With ``iou_threshold`` the cache also holds each image's region-overlap matrix (IoU >= threshold),
    which is what :func:`~interbert.data.masking.mask_region_groups` computes otherwise on every draw.
    """

    def __init__(self, store: FeatureStore, image_ids: Sequence[str], max_regions: int,
                 iou_threshold: float | None = None):
        items = {}
        for image_id in image_ids:
            prepared = prepare_regions(store[image_id], max_regions)
            if iou_threshold is not None:
                prepared["overlaps"] = region_iou(prepared["region_boxes"]) >= iou_threshold
            for value in prepared.values():
                if value is not None:
                    value.flags.writeable = False
            items[image_id] = prepared
        self._items = items  # published complete (see features.py on threads)
        self.nbytes = sum(v.nbytes for item in items.values() for v in item.values() if v is not None)

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray | None]:
        return self._items[image_id]

    @staticmethod
    def estimated_bytes(store: FeatureStore, image_ids: Sequence[str], max_regions: int) -> int:
        """What caching ``image_ids`` takes, from the first image's sizes (float32, ``max_regions`` each)."""
        first = store[image_ids[0]]
        per_region = first.features.shape[1] + 5 + (0 if first.class_probs is None else first.class_probs.shape[1])
        return len(image_ids) * max_regions * (4 * per_region + max_regions)

    @classmethod
    def decide(cls, setting: bool | str, store: FeatureStore, image_ids: Sequence[str], max_regions: int) -> bool:
        """Whether to cache: ``True``/``False`` as given; ``"auto"`` when the cache fits in
        ``AUTO_CACHE_MEMORY_SHARE`` of the memory available now (logged either way)."""
        if setting in (True, False):
            return bool(setting)
        if setting != "auto":
            raise ValueError(f"region cache setting must be true, false or 'auto', not {setting!r}")
        need, available = cls.estimated_bytes(store, image_ids, max_regions), _available_memory()
        fits = available is not None and need <= AUTO_CACHE_MEMORY_SHARE * available
        logger.info("region cache %s: %.0f MB for %d images, %s MB available", "on" if fits else "off",
                    need / 1e6, len(image_ids), "unknown" if available is None else f"{available / 1e6:.0f}")
        return fits


class _CaptionImageDataset(torch.utils.data.Dataset):
    """What both datasets share: aligned captions, a tokenizer, region preparation, seeded randomness.

    ``region_cache``: keep every image's prepared regions in memory (:class:`RegionCache`); ``"auto"``
    when they fit in a quarter of the available memory. Captions are tokenised once, all together."""

    _cache_overlaps = False  # whether the region cache also holds IoU-group overlaps (group masking)

    def __init__(self, captions: Sequence[Caption], store: FeatureStore, tokenizer, max_tokens: int, max_regions: int,
                 word_segmenter: str | None, seed: int, region_cache: bool | str = "auto"):
        self.captions = captions_with_features(captions, store)
        self.skipped_captions = len(captions) - len(self.captions)
        self.store, self.tokenizer = store, tokenizer
        self.max_tokens, self.max_regions, self.word_segmenter = max_tokens, max_regions, word_segmenter
        self.seed, self.epoch = seed, 0
        self.image_ids = sorted({c.image_id for c in self.captions})
        index_of_image = {image_id: n for n, image_id in enumerate(self.image_ids)}
        self.image_codes = np.array([index_of_image[c.image_id] for c in self.captions])
        self.region_cache = None
        if RegionCache.decide(region_cache, store, self.image_ids, max_regions):
            self.region_cache = RegionCache(store, self.image_ids, max_regions,
                                            IOU_GROUP_THRESHOLD if self._cache_overlaps else None)
        # Every caption once, up front (token ids are small): per example the tokenizer cost more than
        # the rest of the example's text work, every epoch.
        self._encoded = encode_captions(tokenizer, [c.text for c in self.captions], max_tokens, word_segmenter)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __len__(self) -> int:
        return len(self.captions)

    def text_lengths(self) -> list[int]:
        """Each caption's token count as tokenised (what ``data.length_buckets: auto`` is chosen from)."""
        return [len(encoded.input_ids) for encoded in self._encoded]

    def region_counts(self) -> list[int]:
        """Each caption's image's region count as prepared (global region included), once per caption
        as batches draw them (``data.region_buckets: auto``). Reads each image once."""
        per_image = [len(self._regions(image_id)["region_features"]) for image_id in self.image_ids]
        return [per_image[code] for code in self.image_codes]

    def _text(self, caption_index: int):
        return self._encoded[caption_index]

    def _regions(self, image_id: str) -> dict[str, np.ndarray | None]:
        if self.region_cache is not None:
            return self.region_cache[image_id]
        return prepare_regions(self.store[image_id], self.max_regions)

    def _pair(self, caption_index: int, image_id: str) -> dict:
        text, regions = self._text(caption_index), self._regions(image_id)
        return {"text": text, "regions": regions, "image_id": image_id, "caption_id": self.captions[caption_index].caption_id}


class PretrainingDataset(_CaptionImageDataset):
    """One example per caption: MSM on the text, MRM on the regions, and an ITM label — the caption is
    kept with p=``p_positive``, else swapped for a TF-IDF hard negative (``hard_ratio``) or a random other
    image's caption.

    ``msm``: ``span`` (the original), ``geometric`` (SpanBERT) or ``token`` (BERT's 15%); ``mrm``:
    ``group`` (IoU groups) or ``region`` (15% each). ``hard_negatives``: ``"tfidf"`` to compute (cached
    in ``cache_dir``), an ``N x k`` array over the aligned captions, or None for random negatives only.
    ``hard_ratio_start``: when given, the hard share ramps from it to ``hard_ratio`` over the run
    (:func:`~interbert.data.negatives.hard_ratio_at`; the training loop calls :meth:`set_progress`);
    before any progress is set (a held-out set) the share is ``hard_ratio``.
    ``clean_features``: every example carries its regions' original features as ``mrm_feature_targets``
    even when the targets are class distributions — what the model's clean matching pass restores.
    ``task_sampling``: ``"joint"`` (every example carries every objective's inputs) or ``"alternate"``
    (UNITER-style, one task per optimisation step, the step told by :meth:`set_progress`): even steps are
    *masked* steps — the caption with its own image, masked, no ITM label — and odd steps *matching*
    steps — the pair as ITM draws it (kept or a negative), unmasked, no MSM/MRM labels. Before any
    progress is set (a held-out set) the examples are joint.
    """

    def __init__(self, captions: Sequence[Caption], store: FeatureStore, tokenizer, max_tokens: int = 36,
                 max_regions: int = 36, msm: str = "span", mrm: str = "group", whole_word: bool = False,
                 word_segmenter: str | None = None, hard_negatives: str | np.ndarray | None = "tfidf",
                 hard_ratio: float = 1.0, p_positive: float = 0.5, num_hard: int = 10,
                 cache_dir: str | Path | None = None, seed: int = 0, region_cache: bool | str = "auto",
                 hard_ratio_start: float | None = None, clean_features: bool = False, task_sampling: str = "joint"):
        self._cache_overlaps = mrm == "group"
        super().__init__(captions, store, tokenizer, max_tokens, max_regions, word_segmenter, seed, region_cache)
        if msm not in TEXT_MASKERS:
            raise ValueError(f"msm must be one of {sorted(TEXT_MASKERS)}, not {msm!r}")
        if mrm not in ("group", "region"):
            raise ValueError(f"mrm must be 'group' or 'region', not {mrm!r}")
        self.msm, self.mrm, self.whole_word = msm, mrm, whole_word or word_segmenter is not None
        for name, share in (("hard_ratio", hard_ratio), ("hard_ratio_start", hard_ratio_start)):
            if share is not None and not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be a share in [0, 1], not {share!r}")
        self.hard_ratio, self.hard_ratio_start, self.p_positive = hard_ratio, hard_ratio_start, p_positive
        self.clean_features = clean_features
        if task_sampling not in TASK_SAMPLING:
            raise ValueError(f"task_sampling must be one of {TASK_SAMPLING}, not {task_sampling!r}")
        self.task_sampling = task_sampling
        self.step, self.total_steps = None, None
        if isinstance(hard_negatives, str):
            if hard_negatives != "tfidf":
                raise ValueError(f"hard_negatives must be 'tfidf', an array or None, not {hard_negatives!r}")
            hard_negatives = tfidf_hard_negatives([c.text for c in self.captions], [c.image_id for c in self.captions],
                                                  k=num_hard, cache_dir=cache_dir)
        self.hard_negatives = hard_negatives
        self.vocab_size, self.mask_token_id = len(tokenizer), tokenizer.mask_token_id

    def masked_token_counts(self, sample: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths, masked)``: the token count and a draw of the masked-token count of ``sample`` captions
        (all, when fewer), picked and masked under their own generator, not the training draws: the
        histogram :func:`masked_count_budgets` sizes the static-shape mode's MSM budget from. Reads no image."""
        rng = np.random.default_rng([self.seed, seed])
        picked = rng.permutation(len(self))[:sample]
        masker, encoded = TEXT_MASKERS[self.msm], [self._encoded[i] for i in picked]
        masked = [int(masker(np.asarray(e.maskable), rng, word_ids=e.word_ids if self.whole_word else None).sum())
                  for e in encoded]
        return np.array([len(e.input_ids) for e in encoded]), np.array(masked)

    def set_progress(self, step: int, total_steps: int) -> None:
        """The optimisation step the next examples are for (the hard-negative schedule reads it)."""
        self.step, self.total_steps = step, total_steps

    def current_hard_ratio(self) -> float:
        if self.step is None:
            return self.hard_ratio
        return hard_ratio_at(self.step, self.total_steps, self.hard_ratio, self.hard_ratio_start)

    def current_task(self) -> str:
        """``"joint"``, or under ``task_sampling="alternate"`` the task of the current step: ``"masked"``
        (even steps) or ``"matching"`` (odd)."""
        if self.task_sampling == "joint" or self.step is None:
            return "joint"
        return ("masked", "matching")[self.step % 2]

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        task = self.current_task()
        if task == "masked":  # MSM/MRM read a caption with its own image, and no ITM label
            caption_index, itm_label = index, None
        else:
            caption_index, itm_label = sample_itm_caption(index, rng, self.image_codes, self.hard_negatives,
                                                          self.current_hard_ratio(), self.p_positive)
        pair = self._pair(caption_index, self.captions[index].image_id)
        text, regions = pair["text"], pair["regions"]
        if task == "matching":  # the pair as written and detected, for ITM (and ITC)
            return {"input_ids": np.asarray(text.input_ids), "region_features": regions["region_features"],
                    "region_boxes": regions["region_boxes"], "itm_labels": itm_label,
                    "image_id": pair["image_id"], "caption_id": pair["caption_id"]}

        ids = np.asarray(text.input_ids)
        word_ids = text.word_ids if self.whole_word else None
        text_mask = TEXT_MASKERS[self.msm](np.asarray(text.maskable), rng, word_ids=word_ids)
        input_ids, msm_labels = apply_token_masking(ids, text_mask, rng, self.mask_token_id, self.vocab_size)

        real = np.ones(len(regions["region_features"]), dtype=bool)
        if self.mrm == "group":
            region_mask = mask_region_groups(regions["region_boxes"], real, rng, overlaps=regions.get("overlaps"))
        else:
            region_mask = mask_regions_independently(real, rng)
        features, targets = apply_region_masking(regions["region_features"], region_mask, regions["class_probs"])
        if self.clean_features and task == "joint":
            targets["mrm_feature_targets"] = np.asarray(regions["region_features"], np.float32)
        example = {"input_ids": input_ids, "msm_labels": msm_labels, "region_features": features,
                   "region_boxes": regions["region_boxes"], **targets,
                   "image_id": pair["image_id"], "caption_id": pair["caption_id"]}
        return example if itm_label is None else {**example, "itm_labels": itm_label}


class RetrievalDataset(_CaptionImageDataset):
    """The original's 4-way groups for retrieval fine-tuning, positive first: (caption, its image),
    (random other caption, image), (caption, random other image), and a hard negative — by default
    (``hard_negative="image"``, as the original) the caption with one of its image's ``num_hard`` nearest
    images by mean region feature; ``"caption"``: the image with a TF-IDF-nearest caption of another image.
    ``collate`` flattens the groups and sets ``group_size=4``."""

    def __init__(self, captions: Sequence[Caption], store: FeatureStore, tokenizer, max_tokens: int = 36,
                 max_regions: int = 36, hard_negative: str = "image", num_hard: int = 100,
                 cache_dir: str | Path | None = None, seed: int = 0, region_cache: bool | str = "auto"):
        super().__init__(captions, store, tokenizer, max_tokens, max_regions, None, seed, region_cache)
        if hard_negative == "image":
            self.hard_pool = image_hard_negatives(mean_region_features(store, self.image_ids), k=num_hard)
        elif hard_negative == "caption":
            self.hard_pool = tfidf_hard_negatives([c.text for c in self.captions], [c.image_id for c in self.captions],
                                                  k=num_hard, cache_dir=cache_dir)
        else:
            raise ValueError(f"hard_negative must be 'image' or 'caption', not {hard_negative!r}")
        self.hard_negative = hard_negative

    def _example(self, caption_index: int, image_id: str) -> dict:
        pair = self._pair(caption_index, image_id)
        return {"input_ids": np.asarray(pair["text"].input_ids), "region_features": pair["regions"]["region_features"],
                "region_boxes": pair["regions"]["region_boxes"], "image_id": image_id, "caption_id": pair["caption_id"]}

    def __getitem__(self, index: int) -> list[dict]:
        rng = self._rng(index)
        image = self.image_codes[index]
        random_image = (image + rng.integers(1, len(self.image_ids))) % len(self.image_ids)
        pool = self.hard_pool[image if self.hard_negative == "image" else index]
        hard = int(pool[rng.integers(0, len(pool))])
        image_id = self.image_ids[image]
        return [
            self._example(index, image_id),
            self._example(random_other_image_caption(index, rng, self.image_codes), image_id),
            self._example(index, self.image_ids[random_image]),
            self._example(index, self.image_ids[hard]) if self.hard_negative == "image" else self._example(hard, image_id),
        ]
