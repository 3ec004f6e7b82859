"""Scoring for caption-based image retrieval: the full protocol and the two-stage variant.

Full protocol (ViLBERT/InterBERT, Flickr30K): every test caption against every test image through
the cross-encoder, e.g. 5,000 x 1,000 pair forwards. The cost that does not depend on the pair is paid
once: each image's region embeddings and each caption's token embeddings are computed once and
broadcast into pair batches, and captions are batched by length so padding stays small.

Two-stage: candidates by single-modal embedding similarity (one text pass per caption, one image pass
per image), then only the top K images of each caption are re-scored by the cross-encoder.

Sharded (under torchrun, ``shard=(rank, world_size)``): each rank scores the pairs of every
``world_size``-th caption in length order (so the ranks get captions of the same lengths, and about the
same work), and the ranks' rows are all-gathered: every rank ends with the full score matrix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from interbert.data.batches import bucket_edges
from interbert.modeling import InterBertForImageTextRetrieval, InterBertForPreTraining, fuse
from interbert.static_scoring import StaticPairScorer, doubling_edges


@dataclass
class RegionInput:
    """One image's model input: global region first, 5-d boxes (see docs/interfaces.md)."""

    features: np.ndarray | torch.Tensor  # R x D
    boxes: np.ndarray | torch.Tensor  # R x 5


@dataclass
class ScoreReport:
    scores: np.ndarray  # captions x images
    pair_forwards: int  # over all ranks
    seconds: float
    pair_forwards_by_rank: list[int] | None = None  # each rank's share (one entry in one process)
    shapes: int | None = None  # static shapes: the (rows, tokens, regions) buckets met (the graphs compiled)


def caption_shard(lengths: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The captions (indices) that ``rank`` scores, sorted by length: every ``world_size``-th one of the
    length order, so each rank's captions are as long as the others' and batch as tightly."""
    order = sorted(range(len(lengths)), key=lambda c: lengths[c])
    return order[rank::world_size]


def _gather_rows(scores: np.ndarray, rows: list[int], forwards: int) -> tuple[np.ndarray, list[int]]:
    """Every rank's scored ``rows`` of the captions x images matrix, gathered on every rank."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (rows, scores[rows], forwards))
    full = np.full_like(scores, np.nan)
    for rank_rows, block, _ in gathered:
        full[rank_rows] = block
    return full, [count for _, _, count in gathered]


def pair_scorer(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The head that turns (text_pooled, image_pooled) into one matching score per pair.

    A retrieval model's score head; for a pretraining model (zero-shot) the ITM margin
    logit[match] - logit[no match], i.e. the log-odds of "match".
    """
    if isinstance(model, InterBertForImageTextRetrieval):
        return lambda t, v: model.score(fuse(t, v, model.config.fusion)).squeeze(-1)
    if isinstance(model, InterBertForPreTraining):
        def itm_margin(t, v):
            logits = model.itm_classifier(fuse(t, v, model.config.fusion))
            return logits[:, 1] - logits[:, 0]

        return itm_margin
    raise TypeError(f"cannot score pairs with {type(model).__name__}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length L_i x ... tensors into B x L x ... plus a B x L keep mask (on their device)."""
    longest = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
    keep = torch.zeros(len(tensors), longest, dtype=torch.bool, device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
        keep[i, : t.shape[0]] = True
    return out, keep


def _embed_images(model: nn.Module, images: Sequence[RegionInput], chunk: int = 64):
    """Region embeddings of every image, computed once: list of (R_i x H) tensors."""
    base, device = model.interbert, _device(model)
    out = []
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk]
        feats, keep = _pad([torch.as_tensor(im.features, dtype=torch.float32, device=device) for im in block])
        boxes, _ = _pad([torch.as_tensor(im.boxes, dtype=torch.float32, device=device) for im in block])
        emb = base.region_embeddings(feats, boxes)
        out.extend(emb[i, keep[i]] for i in range(len(block)))
    return out


def _embed_texts(model: nn.Module, captions: Sequence[Sequence[int]]):
    base, device = model.interbert, _device(model)
    out = []
    for ids in captions:
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)[None]
        out.append(base.embeddings(ids, None)[0])
    return out


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    captions: Sequence[Sequence[int]],
    images: Sequence[RegionInput],
    pairs: np.ndarray | None = None,
    pair_batch_size: int = 512,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    static_shapes: bool = False,
    compile: str = "off",
) -> ScoreReport:
    """Cross-encoder scores of caption x image pairs.

    ``captions``: token ids with [CLS]/[SEP]; ``images``: prepared regions. ``pairs``: a boolean
    captions x images matrix of the pairs to score (default: all, the full protocol); unscored pairs
    are ``nan`` in the result. Runs on the model's device (move the model to a GPU to score there).
    ``shard=(rank, world_size)``: this rank scores its share of the captions (:func:`caption_shard`) and
    the ranks exchange their rows (every rank of the process group must call this alike).
    ``static_shapes`` (implied by a ``compile`` mode other than ``off``): every pair batch padded to buckets
    and scored the static-shape way (:func:`static_scorer`), through ``torch.compile`` with ``compile``.
    """
    model.eval()
    scorer = _batch_scorer(model, captions, images, pair_batch_size, static_shapes, compile)
    n_c, n_i = len(captions), len(images)
    wanted = np.ones((n_c, n_i), dtype=bool) if pairs is None else np.asarray(pairs, dtype=bool)
    scores = np.full((n_c, n_i), np.nan, dtype=np.float32)
    start_time = time.perf_counter()
    image_emb = _embed_images(model, images)
    text_emb = _embed_texts(model, captions)

    # Captions sorted by length; pair batches = (one image) x (a run of similar-length captions),
    # or several images x those captions when the runs are short.
    rank, world_size = shard or (0, 1)
    order = caption_shard([len(c) for c in captions], rank, world_size)
    caption_block = max(1, min(pair_batch_size, len(order)))
    image_block = max(1, pair_batch_size // caption_block)
    total = int(wanted[order].sum())
    bar = tqdm(total=total, desc="scoring pairs", unit="pair", disable=not progress, leave=False)
    for c0 in range(0, len(order), caption_block):
        cap_ids = order[c0 : c0 + caption_block]
        texts, text_keep = _pad([text_emb[c] for c in cap_ids])
        for i0 in range(0, n_i, image_block):
            img_ids = list(range(i0, min(n_i, i0 + image_block)))
            sel = [(ci, ii) for ii in img_ids for ci, c in enumerate(cap_ids) if wanted[c, ii]]
            if not sel:
                continue
            cap_rows = torch.tensor([ci for ci, _ in sel], device=texts.device)
            ims, im_keep = _pad([image_emb[ii] for ii in img_ids])
            im_rows = torch.tensor([img_ids.index(ii) for _, ii in sel], device=texts.device)
            s = scorer(texts[cap_rows], text_keep[cap_rows], ims[im_rows], im_keep[im_rows]).float().cpu().numpy()
            for (ci, ii), value in zip(sel, s):
                scores[cap_ids[ci], ii] = value
            bar.update(len(sel))
    bar.close()
    by_rank, shapes = [total], len(scorer.shapes) if isinstance(scorer, StaticPairScorer) else None
    if world_size > 1:
        scores, by_rank = _gather_rows(scores, order, total)
    return ScoreReport(scores=scores, pair_forwards=sum(by_rank), seconds=time.perf_counter() - start_time,
                       pair_forwards_by_rank=by_rank, shapes=shapes)


def static_scorer(model: nn.Module, captions: Sequence[Sequence[int]], images: Sequence[RegionInput],
                  pair_batch_size: int = 512, compile: str = "off") -> StaticPairScorer:
    """The full protocol's scorer on static shapes: pair rows padded to doubling buckets up to
    ``pair_batch_size``, captions and region lists to length buckets from the split's own length histograms
    (as ``data.length_buckets: auto`` chooses them for training), so a compiled run builds a handful of graphs."""
    return StaticPairScorer(
        model.interbert, pair_scorer(model), compile=compile, row_edges=doubling_edges(max(1, pair_batch_size)),
        text_edges=bucket_edges([len(c) for c in captions]) if captions else None,
        region_edges=bucket_edges([len(im.boxes) for im in images]) if images else None)


def _batch_scorer(model: nn.Module, captions, images, pair_batch_size: int, static_shapes: bool, compile: str):
    """(texts, text_keep, images, image_keep) -> scores: today's packed eager pass, or the static one."""
    if static_shapes or compile != "off":
        return static_scorer(model, captions, images, pair_batch_size, compile)
    head = pair_scorer(model)

    def eager(texts, text_keep, ims, im_keep):
        out = model.interbert.encode(texts, text_keep, ims, im_keep)
        return head(out.text_pooled, out.image_pooled)

    return eager


@torch.no_grad()
def embedding_similarity(
    model: nn.Module, captions: Sequence[Sequence[int]], images: Sequence[RegionInput], batch_size: int = 128
) -> np.ndarray:
    """captions x images cosine similarity of the single-modal embeddings (text-only / regions-only passes)."""
    model.eval()
    base, device = model.interbert, _device(model)
    text_vecs, image_vecs = [], []
    for start in range(0, len(captions), batch_size):
        block = captions[start : start + batch_size]
        ids, keep = _pad([torch.as_tensor(c, dtype=torch.long, device=device) for c in block])
        text_vecs.append(base.embed_text(ids, keep.long()))
    for start in range(0, len(images), batch_size):
        block = images[start : start + batch_size]
        feats, keep = _pad([torch.as_tensor(im.features, dtype=torch.float32, device=device) for im in block])
        boxes, _ = _pad([torch.as_tensor(im.boxes, dtype=torch.float32, device=device) for im in block])
        image_vecs.append(base.embed_images(feats, boxes, keep.long()))
    return (torch.cat(text_vecs) @ torch.cat(image_vecs).T).float().cpu().numpy()


def two_stage_scores(
    model: nn.Module,
    captions: Sequence[Sequence[int]],
    images: Sequence[RegionInput],
    k: int,
    pair_batch_size: int = 512,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    static_shapes: bool = False,
    compile: str = "off",
) -> ScoreReport:
    """Candidates by embedding similarity, the top ``k`` per caption re-ranked by the cross-encoder.

    Every image still gets a rank: re-ranked candidates come first (by pair score), the rest follow in
    embedding-similarity order, so recall at any K and mean rank stay defined.
    """
    start_time = time.perf_counter()
    sim = embedding_similarity(model, captions, images)
    k = min(k, sim.shape[1])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    chosen = np.zeros_like(sim, dtype=bool)
    np.put_along_axis(chosen, top, True, axis=1)
    report = score_pairs(model, captions, images, pairs=chosen, pair_batch_size=pair_batch_size, progress=progress,
                         shard=shard, static_shapes=static_shapes, compile=compile)
    # candidates (shifted to >= 1) rank above every non-candidate (similarity - 2 <= -1)
    pair = report.scores
    floor = np.nanmin(pair) if chosen.any() else 0.0
    final = np.where(chosen, np.nan_to_num(pair - floor) + 1.0, sim - 2.0).astype(np.float32)
    return ScoreReport(scores=final, pair_forwards=report.pair_forwards, seconds=time.perf_counter() - start_time,
                       pair_forwards_by_rank=report.pair_forwards_by_rank, shapes=report.shapes)
