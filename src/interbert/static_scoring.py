"""Pair scoring on a few fixed shapes (issue 26): the full protocol's pair batches and the service's re-rank,
the encoder in its static-shape mode, optionally through ``torch.compile``.

A compiled scorer builds one graph per input shape, and scoring sees many: the last pair batch of a caption
block is short, a re-rank's candidate list has any length up to its cap, every caption block and image block
has its own longest caption and region list. :class:`StaticPairScorer` pads each batch up to buckets (pair
rows, caption tokens, regions) so that a scoring run meets a handful of shapes, and runs the encoder the
static way (``InterBertModel.encode(static=True)``: every position computed, the pad masked as attention keys),
which has no data-dependent shapes or host syncs and so captures as one graph. Padded rows repeat the batch's
first pair (a real pair: no row of masked keys only) and their scores are dropped; padded positions are masked
keys. The scores are those of the default (packed) path to float rounding (tests/model/test_static_scoring.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from interbert.data.batches import bucket_length

# torch.compile's modes a scorer takes: ``off`` runs the static shapes eagerly; the last two are CUDA's (CUDA
# graphs, GPU autotuning), what ``train.compile`` may name when a recipe's validation reuses it.
SCORER_COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
CUDA_ONLY_MODES = ("reduce-overhead", "max-autotune")
# Graphs a compiled scorer may need, one per (rows, tokens, regions) bucket: with power-of-two rows up to 512 and
# 4 text x 4 region edges, 7 x 16. Dynamo's default is 8 per function, past which it scores eagerly.
RECOMPILE_LIMIT = 128
SMALLEST_BUCKET = 8

Head = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def doubling_edges(largest: int, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """``smallest``, twice that, ... below ``largest``, and ``largest`` itself: buckets for a size that can be
    anything up to a cap (a re-rank's candidates, a query's tokens), log2 shapes instead of one per size."""
    if largest < 1:
        raise ValueError(f"the largest bucket must be >= 1, got {largest}")
    edges, edge = [], smallest
    while edge < largest:
        edges.append(edge)
        edge *= 2
    return [*edges, largest]


def _padded(x: torch.Tensor, keep: torch.Tensor, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B x L x H embeddings and their B x L keep mask padded to ``rows`` x ``length``: new positions are masked
    zeros, new rows repeat row 0 (a real row, so that no row attends over masked keys only)."""
    extra = length - x.shape[1]
    if extra:
        x, keep = F.pad(x, (0, 0, 0, extra)), F.pad(keep, (0, extra), value=False)
    if rows > x.shape[0]:
        index = torch.zeros(rows, dtype=torch.long, device=x.device)
        index[: x.shape[0]] = torch.arange(x.shape[0], device=x.device)
        x, keep = x.index_select(0, index), keep.index_select(0, index)
    return x, keep


class StaticPairScorer:
    """One matching score per row of embedded (text, image) pairs, computed on bucketed shapes.

    ``encoder``: an :class:`~interbert.modeling.InterBertModel`; ``head``: (text_pooled, image_pooled) -> B
    scores (:func:`interbert.retrieval.pair_scorer`). ``row_edges`` / ``text_edges`` / ``region_edges``: the
    bucket edges of each padded dimension (None: that dimension is not padded). ``compile``: ``off`` (static
    shapes, eager) or a ``torch.compile`` mode, compiled with ``dynamic=False``: one graph per bucket shape.
    Safe to call from several threads (no model state is switched; dynamo compiles under its own lock)."""

    def __init__(self, encoder: torch.nn.Module, head: Head, compile: str = "off",
                 row_edges: Sequence[int] | None = None, text_edges: Sequence[int] | None = None,
                 region_edges: Sequence[int] | None = None):
        if compile not in SCORER_COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(SCORER_COMPILE_MODES)}, got {compile!r}")
        device = next(encoder.parameters()).device
        if compile in CUDA_ONLY_MODES and device.type != "cuda":
            raise ValueError(f"compile={compile} is a CUDA mode; the model is on {device.type}: use default or off")
        self.encoder, self.head, self.compile = encoder, head, compile
        self.row_edges, self.text_edges, self.region_edges = row_edges, text_edges, region_edges
        self.shapes: set[tuple[int, int, int]] = set()  # the bucket shapes met so far: the graphs compiled
        self._scores = self.static_scores
        if compile != "off":
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            self._scores = torch.compile(self.static_scores, mode=compile, dynamic=False)

    def static_scores(self, text: torch.Tensor, text_keep: torch.Tensor, image: torch.Tensor,
                      image_keep: torch.Tensor) -> torch.Tensor:
        """The encoder's static-shape pass and the head, on inputs already padded: what gets compiled."""
        out = self.encoder.encode(text, text_keep, image, image_keep, static=True)
        return self.head(out.text_pooled, out.image_pooled)

    def __call__(self, text: torch.Tensor, text_keep: torch.Tensor, image: torch.Tensor,
                 image_keep: torch.Tensor) -> torch.Tensor:
        """Scores of the B pairs (row i of the embedded text with row i of the embedded regions)."""
        n = text.shape[0]
        rows = bucket_length(n, self.row_edges)
        text, text_keep = _padded(text, text_keep.bool(), rows, bucket_length(text.shape[1], self.text_edges))
        image, image_keep = _padded(image, image_keep.bool(), rows, bucket_length(image.shape[1], self.region_edges))
        self.shapes.add((rows, text.shape[1], image.shape[1]))
        return self._scores(text, text_keep, image, image_keep)[:n]
