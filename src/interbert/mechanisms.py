"""Measurements of the two mechanisms InterBERT's research questions rest on, on a pretrained model (issue 28).

- :func:`mrm_leakage` (RQ1, masked group modeling): how much a masked region's neighbours give its answer
  away. Every detector region of every image is an *anchor* once; the model predicts the anchor's class
  with (a) the anchor's whole IoU group masked (``IOU_GROUP_THRESHOLD``, what group masking hides) and
  (b) the anchor alone masked (plain per-region masking). Only the anchor is scored in both, with the
  caption unmasked, so the difference of the two accuracies is what the unmasked neighbours leak.
  Where no region overlaps another (``data synth --proposals-per-object 1``) the two inputs are the same.
- :func:`itm_twins` (RQ2, hard negatives): the ITM head's accuracy on a caption against its own image and
  against the image's twin (a near-duplicate whose captions use the same words: only binding words to
  regions tells them apart) vs against a random other image. TF-IDF negatives are meant to teach the first.

Both run the model's own heads and inputs: the masking of :mod:`interbert.data.masking`, the batches of
:func:`interbert.data.batches.collate`, the MRM objective of ``InterBertForPreTraining.forward`` and the ITM
margin of :func:`interbert.retrieval.score_pairs`. Nothing is random in :func:`mrm_leakage`; :func:`itm_twins`
draws each caption's random image from ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from interbert.data.batches import collate
from interbert.data.masking import IGNORE_INDEX, IOU_GROUP_THRESHOLD, apply_region_masking, region_iou
from interbert.modeling import InterBertForPreTraining
from interbert.retrieval import RegionInput, score_pairs

MASKINGS = ("group", "plain")


def anchor_examples(token_ids: Sequence[int], regions: Mapping[str, np.ndarray | None], image_id: str,
                    masking: str) -> list[dict]:
    """One MRM example per detector region of one image (``prepare_regions`` output, global region first):
    that region (the anchor) masked with its IoU group (``"group"``) or alone (``"plain"``), only the anchor
    scored (``mrm_mask``), the caption as written (``msm_labels`` all ignored: the MSM head scores nothing)."""
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, not {masking!r}")
    boxes, features = regions["region_boxes"], regions["region_features"]
    groups = region_iou(boxes) >= IOU_GROUP_THRESHOLD
    groups[:, 0] = False  # the global region is never masked (as in pretraining)
    ids = np.asarray(token_ids)
    examples = []
    for anchor in range(1, len(boxes)):
        scored = np.zeros(len(boxes), dtype=bool)
        scored[anchor] = True
        masked, targets = apply_region_masking(features, groups[anchor] if masking == "group" else scored,
                                               regions.get("class_probs"))
        examples.append({"input_ids": ids, "msm_labels": np.full(len(ids), IGNORE_INDEX), "region_features": masked,
                         "region_boxes": boxes, **targets, "mrm_mask": scored, "image_id": image_id,
                         "caption_id": f"{image_id}:anchor{anchor}"})
    return examples


@torch.no_grad()
def _mrm_scores(model: InterBertForPreTraining, examples: Sequence[dict], batch_size: int) -> tuple[float | None, float]:
    """(accuracy of the predicted class at the anchors, or None for feature targets; mean MRM loss)."""
    device = next(model.parameters()).device
    right, loss_sum = 0, 0.0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "image_index"}
        out = model(**inputs)
        count = int(inputs["mrm_mask"].sum())
        loss_sum += float(out.mrm_loss) * count
        if out.mrm_class_logits is not None:
            targets = inputs["mrm_class_targets"][inputs["mrm_mask"]]
            right += int((out.mrm_class_logits.argmax(-1) == targets.argmax(-1)).sum())
    classes = model.config.mrm_target == "classes"
    return (right / len(examples) if classes else None), loss_sum / len(examples)


def mrm_leakage(model: InterBertForPreTraining, captions: Sequence[Sequence[int]],
                images: Sequence[Mapping[str, np.ndarray | None]], image_ids: Sequence[str] | None = None,
                batch_size: int = 64) -> dict:
    """MRM on held-out images with group vs plain masking at evaluation (see the module docstring).

    ``captions[i]``: token ids of one caption of image i; ``images[i]``: its ``prepare_regions`` output.
    Returns, per masking, ``accuracy`` (the predicted class is the detector's top class; None when the model
    regresses features) and ``loss`` (the model's MRM loss), their differences plain - group (``leak``), the
    number of anchors, the share of anchors whose group holds other regions and the mean group size."""
    if len(captions) != len(images):
        raise ValueError(f"mrm_leakage: {len(captions)} captions for {len(images)} images (one caption each)")
    ids = image_ids if image_ids is not None else [str(i) for i in range(len(images))]
    model.eval()
    result: dict = {}
    for masking in MASKINGS:
        examples = [e for c, im, i in zip(captions, images, ids) for e in anchor_examples(c, im, i, masking)]
        accuracy, loss = _mrm_scores(model, examples, batch_size)
        result[masking] = {"accuracy": accuracy, "loss": loss}
    sizes = np.concatenate([(region_iou(im["region_boxes"])[1:, 1:] >= IOU_GROUP_THRESHOLD).sum(1) for im in images])
    group, plain = result["group"], result["plain"]
    result["leak"] = {"accuracy": None if group["accuracy"] is None else plain["accuracy"] - group["accuracy"],
                      "loss": group["loss"] - plain["loss"]}
    result.update(anchors=int(len(sizes)), grouped_share=float((sizes > 1).mean()), mean_group_size=float(sizes.mean()))
    return result


def itm_twins(model: InterBertForPreTraining, captions: Sequence[Sequence[int]], caption_image: Sequence[int],
              images: Sequence[RegionInput], twin_of: Mapping[int, int], seed: int = 0,
              pair_batch_size: int = 512) -> dict:
    """The ITM head on twin pairs vs random pairs (see the module docstring).

    ``caption_image[c]``: the index in ``images`` of caption c's image; ``twin_of``: image index -> its twin's.
    Each caption of an image with a twin is scored (ITM margin, log-odds of "match") against its own image,
    the twin, and one random image that is neither (drawn from ``seed``). Per kind of negative: ``accuracy``,
    the ITM decision right on the positive and on the negative, averaged (chance 0.5), and ``choice``, the
    share of captions whose own image scores above the negative (ties count against; chance 0.5)."""
    if len(images) < 3:
        raise ValueError(f"itm_twins needs at least 3 images (own, twin, a random other), got {len(images)}")
    index = np.asarray(caption_image)
    rows = [c for c in range(len(captions)) if int(index[c]) in twin_of]
    if not rows:
        raise ValueError("itm_twins: no caption belongs to an image with a twin")
    bad = {a: b for a, b in twin_of.items() if a == b or not 0 <= b < len(images)}
    if bad:
        raise ValueError(f"itm_twins: twin_of must map an image to another image of the {len(images)}, got {bad}")
    rng = np.random.default_rng(seed)
    own = index[rows]
    twin = np.array([twin_of[int(i)] for i in own])
    others = rng.integers(0, len(images) - 2, size=len(rows))  # uniform over the images that are neither
    low, high = np.minimum(own, twin), np.maximum(own, twin)
    random = others + (others >= low) + (others + (others >= low) >= high)
    wanted = np.zeros((len(rows), len(images)), dtype=bool)
    for negatives in (own, twin, random):
        wanted[np.arange(len(rows)), negatives] = True
    scores = score_pairs(model, [captions[c] for c in rows], images, pairs=wanted, pair_batch_size=pair_batch_size,
                         progress=False).scores
    at = np.arange(len(rows))
    positive = scores[at, own]
    result = {"captions": len(rows), "positive_accuracy": float((positive > 0).mean())}
    for name, column in (("twin", twin), ("random", random)):
        negative = scores[at, column]
        result[name] = {"accuracy": float(((positive > 0).mean() + (negative < 0).mean()) / 2),
                        "choice": float((positive > negative).mean()),
                        "negative_accuracy": float((negative < 0).mean())}
    return result
