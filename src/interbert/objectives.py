"""InterBERT's pretraining objectives, one class each: target selection, head and loss.

One pretraining step (``InterBertForPreTraining.forward``), in order:

    batch -> PretrainingInputs        the caption as given and as written (masked ids restored), the regions
                                      as given and as detected, their feature projection computed once
          -> ItmObjective.pair        ITM's pairs: the data's, or in-batch negatives drawn by similarity
          -> PassPlan.run (modeling)  the masked pass, at the positions MSM and MRM score (+ the poolers'
                                      first position), and the clean pass ITM reads when it reads clean pairs
          -> MsmObjective, MrmObjective, ItmObjective, ItcObjective: each its head and its loss

Each objective owns its target selection, its head and its loss; the choices the config makes
(``msm_pairs``, ``mrm_target``, ``itm_negatives``, ``itm_inputs``, ITC on/off) are fixed when the model
builds its objectives, not tested per step.

Why the heads are registered on the model, not on the objective: checkpoints (and the converter of the
original code) name them ``msm_transform``, ``msm_bias``, ``mrm_transform``, ``mrm_class_decoder`` /
``mrm_feature_decoder``, ``itm_dropout``, ``itm_classifier`` at the top of ``InterBertForPreTraining``, and a
submodule would prefix its name to every key. So an objective builds its head (``heads``), the model registers
it under those names, and the objective reads it through the model at each call: loading on the meta device
or resizing the vocabulary replaces parameters, and a reference kept here would go stale. The objectives
are plain objects, not ``nn.Module``: nothing of them is saved, and no parameter gets a second name.

To add an objective: an ``Objective`` with ``heads`` (what to register, under the names its checkpoints use)
and ``forward(passes, batch) -> ObjectiveOutput``; build it in ``InterBertForPreTraining.__init__``, add its line
(and its weight) to ``forward``, its loss field to ``InterBertPreTrainingOutput``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from interbert.config import InterBertConfig
from interbert.data.negatives import in_batch_itm_pairs

if TYPE_CHECKING:
    from interbert.modeling import EncoderPasses, InterBertForPreTraining

IGNORE = -100  # the label of a position no loss scores (torch's cross_entropy ignore_index)
# the padding of msm_positions: interbert.data.masking.NO_POSITION's value, defined here too because a model
# folder's code (interbert.remote_code) carries this module and not the data package (a test holds them equal)
NO_POSITION = -1


# --------------------------------------------------------------------------------------------------
# What the objectives read
# --------------------------------------------------------------------------------------------------
@dataclass
class PretrainingInputs:
    """One step's batch as the objectives read it. Every label is optional: a masked step of
    ``task_sampling=alternate`` has no ``itm_labels``, its matching step no ``msm_labels`` / ``mrm_mask``,
    inference none at all."""

    text: dict  # the caption as given (masked): input_ids, attention_mask, token_type_ids
    clean_text: dict  # as written: the masked ids restored from msm_labels
    image: dict  # the regions as given (masked), their projection in region_projection
    clean_image: dict  # as detected: the masked rows' projection restored from mrm_feature_targets
    msm_labels: torch.Tensor | None = None
    mrm_mask: torch.Tensor | None = None
    mrm_class_targets: torch.Tensor | None = None
    mrm_feature_targets: torch.Tensor | None = None
    itm_labels: torch.Tensor | None = None
    image_index: torch.Tensor | None = None  # equal values: captions of the same picture
    full_logits: bool = False  # the heads score every position (not only the masked ones)
    msm_positions: torch.Tensor | None = None  # the static-shape mode's masked-token budget (MsmObjective)
    # set by in-batch pairing: the clean single-modal embeddings of every pair, which drew the negatives
    # (ITC's loss is taken on them) and that the pairs' labels are the model's, not the data's
    pair_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    repaired: bool = False

    IMAGE_SIDE = ("image", "clean_image", "mrm_mask", "mrm_class_targets", "mrm_feature_targets")

    @property
    def restored(self) -> bool:
        """Whether the clean inputs differ from the given ones (something was masked and can be restored)."""
        return self.msm_labels is not None or (self.mrm_feature_targets is not None and self.mrm_mask is not None)

    @property
    def matching_only(self) -> bool:
        """A matching step (UNITER-style alternation): ITM labels and nothing masked, so no head but ITM's."""
        return self.itm_labels is not None and self.msm_labels is None and self.mrm_mask is None and not self.full_logits

    def with_images(self, order: torch.Tensor) -> "PretrainingInputs":
        """Caption i paired with image ``order[i]``: the image side (regions, their masks and targets) re-ordered."""
        return dataclasses.replace(self, **{name: _take_rows(getattr(self, name), order) for name in self.IMAGE_SIDE})


def _take_rows(value, order: torch.Tensor):
    """``value`` (a tensor, a dict of tensors, or None) with its rows in ``order``."""
    if isinstance(value, dict):
        return {k: _take_rows(v, order) for k, v in value.items()}
    return None if value is None else value[order]


@dataclass
class ObjectiveOutput:
    """What one objective gives the step: its loss and the output fields it fills."""

    loss: torch.Tensor | None = None  # None: nothing in the batch for this objective to score
    outputs: dict = field(default_factory=dict)  # the InterBertPreTrainingOutput fields it fills (its logits)


# --------------------------------------------------------------------------------------------------
# Heads and losses
# --------------------------------------------------------------------------------------------------
class HeadTransform(nn.Module):
    """Dense + activation + LayerNorm, as in BERT's prediction heads."""

    def __init__(self, config: InterBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


def fuse(text_pooled: torch.Tensor, image_pooled: torch.Tensor, fusion: str) -> torch.Tensor:
    """The cross-modal pair representation that the matching heads read."""
    return text_pooled * image_pooled if fusion == "mul" else text_pooled + image_pooled


def mrm_loss(predictions: torch.Tensor, targets: torch.Tensor, target: str = "classes") -> torch.Tensor:
    """Masked region modeling over the N scored regions (rows). ``target="classes"``: KL from the
    predicted class logits to the detector's class distribution; ``"features"``: feature regression
    (mean squared error per dimension, so its scale does not grow with the feature size). Zero, with
    the graph kept, when no region is scored."""
    if predictions.shape[0] == 0:
        return 0.0 * predictions.sum()
    if target == "classes":
        return F.kl_div(F.log_softmax(predictions, dim=-1), targets, reduction="sum") / predictions.shape[0]
    return F.mse_loss(predictions, targets)


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``text`` matches row i of ``image``; other rows are negatives."""
    logits = text @ image.T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def masked_contrastive_loss(text: torch.Tensor, image: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`contrastive_loss` of the rows where ``rows`` (B bool) is True, from every row's embeddings with
    the others masked out: static shapes (no row selection), for a compiled step. 0 (with the graph) for
    fewer than two rows, as the selected form gives."""
    logits = text @ image.T / temperature
    floor = torch.finfo(logits.dtype).min  # not -inf: a row with every column masked stays finite (no NaN grads)
    pair = rows[:, None] & rows[None, :]
    logits = logits.masked_fill(~pair, floor)
    diagonal = logits.diagonal()
    count = rows.sum().clamp(min=1).to(logits.dtype)
    text_to_image = torch.where(rows, torch.logsumexp(logits, dim=1) - diagonal, 0.0).sum() / count
    image_to_text = torch.where(rows, torch.logsumexp(logits, dim=0) - diagonal, 0.0).sum() / count
    return (text_to_image + image_to_text) / 2


def masked_mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the targets that are not IGNORE; 0 (with the graph) when every one is:
    what the selected form gives, without testing the batch on the host."""
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return total / (targets != IGNORE).sum().clamp(min=1).to(total.dtype)


def masked_mrm_loss(predictions: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor, target: str) -> torch.Tensor:
    """:func:`mrm_loss` over the rows where ``scored`` (N bool) is True, from every row: static shapes."""
    count = scored.sum().clamp(min=1).to(predictions.dtype)
    if target == "classes":
        per_row = F.kl_div(F.log_softmax(predictions, dim=-1), targets, reduction="none").sum(-1)
    else:
        per_row = (predictions - targets).pow(2).mean(-1)
    return torch.where(scored, per_row, 0.0).sum() / count


# --------------------------------------------------------------------------------------------------
# The objectives
# --------------------------------------------------------------------------------------------------
class Objective:
    """One pretraining objective: ``forward(passes, batch)`` reads the encoder passes it needs and returns
    its loss (None when the batch has nothing for it) and the output fields it fills."""

    @staticmethod
    def heads(config: InterBertConfig) -> dict:
        """The head's modules and parameters, by the names the model registers them under (its checkpoint keys)."""
        return {}

    def forward(self, passes: EncoderPasses, batch: PretrainingInputs) -> ObjectiveOutput:
        raise NotImplementedError

    def __call__(self, passes: EncoderPasses, batch: PretrainingInputs) -> ObjectiveOutput:
        return self.forward(passes, batch)


class MsmObjective(Objective):
    """Masked segment modeling: predict the masked tokens of the caption from the masked pass.

    The decoder is tied to the word embeddings (weight) with its own bias ``msm_bias``. ``msm_pairs="all"``
    (the original) scores every pair, ``"matched"`` only the pairs whose ITM label is 1 (a mismatched
    caption says nothing about the image)."""

    @staticmethod
    def heads(config: InterBertConfig) -> dict:
        return {"msm_transform": HeadTransform(config), "msm_bias": nn.Parameter(torch.zeros(config.vocab_size))}

    def __init__(self, model: InterBertForPreTraining, msm_pairs: str):
        self.model = model
        self.matched_only = msm_pairs == "matched"

    def targets(self, batch: PretrainingInputs) -> torch.Tensor | None:
        """``msm_labels``, with IGNORE on the mismatched pairs when only matched pairs are scored."""
        labels = batch.msm_labels
        if labels is None or not self.matched_only or batch.itm_labels is None:
            return labels
        return labels.masked_fill(~batch.itm_labels.bool()[:, None], IGNORE)

    def positions(self, batch: PretrainingInputs) -> torch.Tensor | None:
        """The tokens the head reads (B x T bool); None: every token (no labels, or ``full_logits``)."""
        targets = self.targets(batch)
        return None if targets is None or batch.full_logits else targets != IGNORE

    def forward(self, passes: EncoderPasses, batch: PretrainingInputs) -> ObjectiveOutput:
        if passes.masked is None or passes.masked.text_sequence is None:
            return ObjectiveOutput()
        at, targets = self.positions(batch), self.targets(batch)
        sequence = passes.masked.text_sequence
        if self.model.static_shapes:
            return self._static_forward(sequence, targets, None if batch.full_logits else batch.msm_positions)
        hidden = sequence if at is None else sequence[at]
        word_embeddings = self.model.interbert.embeddings.word_embeddings.weight
        logits = F.linear(self.model.msm_transform(hidden), word_embeddings, self.model.msm_bias)
        outputs = {"msm_logits": logits}
        if targets is None:
            return ObjectiveOutput(None, outputs)
        targets = targets.flatten() if at is None else targets[at]
        if not (targets != IGNORE).any():  # no masked token: zero, with the graph DistributedDataParallel needs
            return ObjectiveOutput(0.0 * logits.sum(), outputs)
        return ObjectiveOutput(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE), outputs)

    def _static_forward(self, sequence: torch.Tensor, targets: torch.Tensor | None,
                        budget: torch.Tensor | None) -> ObjectiveOutput:
        """The static-shape mode: no row selection whose size depends on the data. Without a budget every
        position goes through the head (``msm_logits`` B x T x V) and the loss ignores the unmasked ones; with
        ``msm_positions`` (K flat indices, :data:`~interbert.data.masking.NO_POSITION` as padding) only those K
        rows do (``msm_logits`` K x V), gathered by index: the vocabulary projection at every position was
        most of a step's arithmetic, the masked tokens are a seventh of the positions."""
        decoder = self.model.interbert.embeddings.word_embeddings.weight
        if budget is None:
            logits = F.linear(self.model.msm_transform(sequence), decoder, self.model.msm_bias)
            flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), None if targets is None else targets.flatten()
        else:
            if not torch.compiler.is_compiling():  # a clear error for a hand-made batch; a compiled step trusts collate
                self.check_budget(budget, targets, sequence.shape[:2])
            rows = budget.clamp(min=0)  # the padding reads row 0, and its target is IGNORE
            hidden = sequence.flatten(0, 1).index_select(0, rows)
            logits = flat_logits = F.linear(self.model.msm_transform(hidden), decoder, self.model.msm_bias)
            if targets is not None:
                flat_targets = targets.flatten().index_select(0, rows).masked_fill(budget == NO_POSITION, IGNORE)
            else:
                flat_targets = None
        outputs = {"msm_logits": logits}
        if flat_targets is None:
            return ObjectiveOutput(None, outputs)
        return ObjectiveOutput(masked_mean_cross_entropy(flat_logits, flat_targets), outputs)

    @staticmethod
    def check_budget(budget: torch.Tensor, targets: torch.Tensor | None, shape: torch.Size) -> None:
        """``msm_positions`` must be flat indices into the B x T text (or the padding) and hold every masked
        token, or the loss would silently leave some out."""
        b, t = shape
        if budget.dim() != 1 or budget.dtype != torch.long:
            raise ValueError(f"msm_positions must be a 1-d long tensor of flat indices into the {b} x {t} text, "
                             f"got shape {tuple(budget.shape)} and dtype {budget.dtype}")
        if bool(((budget < NO_POSITION) | (budget >= b * t)).any()):
            raise ValueError(f"msm_positions must lie in [0, {b * t}) (the {b} x {t} text, flattened) or be "
                             f"{NO_POSITION} (padding), got values outside it")
        if targets is not None:
            covered = torch.zeros(b * t, dtype=torch.bool, device=budget.device).index_fill(0, budget[budget >= 0], True)
            missing = ((targets.flatten() != IGNORE) & ~covered).nonzero()
            if len(missing):
                raise ValueError(f"msm_positions leave out {len(missing)} masked token(s) of msm_labels, the first "
                                 f"at flat position {int(missing[0])}: build them with "
                                 "interbert.data.batches.masked_positions")


class MrmObjective(Objective):
    """Masked region modeling: predict each masked region of a matched pair (the regions of a mismatched
    caption are not predictable from it) from the masked pass: the detector's class distribution (KL,
    ``mrm_target="classes"``, the paper) or the region's features (regression, ``"features"``). Only the
    decoder of that target is built: one no loss trains would leave DistributedDataParallel waiting."""

    _BY_TARGET = {"classes": ("mrm_class_decoder", "mrm_class_logits", "mrm_class_targets"),
                  "features": ("mrm_feature_decoder", "mrm_feature_predictions", "mrm_feature_targets")}

    @staticmethod
    def heads(config: InterBertConfig) -> dict:
        size = config.num_region_classes if config.mrm_target == "classes" else config.region_feature_size
        decoder, _, _ = MrmObjective._BY_TARGET[config.mrm_target]
        return {"mrm_transform": HeadTransform(config), decoder: nn.Linear(config.hidden_size, size)}

    def __init__(self, model: InterBertForPreTraining, mrm_target: str):
        self.model = model
        self.target = mrm_target
        self.decoder, self.output, self.targets_field = self._BY_TARGET[mrm_target]

    @staticmethod
    def scored(batch: PretrainingInputs) -> torch.Tensor | None:
        """The regions the loss scores (B x R bool): masked, of matched pairs; None without ``mrm_mask``."""
        if batch.mrm_mask is None:
            return None
        scored = batch.mrm_mask.bool()
        return scored if batch.itm_labels is None else scored & batch.itm_labels.bool()[:, None]

    def positions(self, batch: PretrainingInputs) -> torch.Tensor | None:
        """The regions the head reads; None: every region (no mask, or ``full_logits``)."""
        return None if batch.full_logits else self.scored(batch)

    def _targets(self, batch: PretrainingInputs) -> torch.Tensor:
        targets = getattr(batch, self.targets_field)
        if targets is None:
            other = "features" if self.target == "classes" else "classes"
            raise ValueError(
                f"this model predicts region {self.target} (config.mrm_target) but the batch has no "
                f"{self.targets_field}; build the model with mrm_target={other!r} for these features")
        return targets

    def forward(self, passes: EncoderPasses, batch: PretrainingInputs) -> ObjectiveOutput:
        if passes.masked is None or passes.masked.image_sequence is None:
            return ObjectiveOutput()
        at, scored = self.positions(batch), self.scored(batch)
        sequence = passes.masked.image_sequence
        if self.model.static_shapes:  # every region through the head, the unscored ones masked out of the loss
            predictions = getattr(self.model, self.decoder)(self.model.mrm_transform(sequence))
            outputs = {self.output: predictions}
            if scored is None:
                return ObjectiveOutput(None, outputs)
            targets = self._targets(batch)
            return ObjectiveOutput(masked_mrm_loss(predictions.flatten(0, 1), targets.flatten(0, 1), scored.flatten(),
                                                   self.target), outputs)
        hidden = self.model.mrm_transform(sequence if at is None else sequence[at])
        predictions = getattr(self.model, self.decoder)(hidden)
        outputs = {self.output: predictions}
        if scored is None:
            return ObjectiveOutput(None, outputs)
        targets = self._targets(batch)
        scored_predictions = predictions if at is not None else predictions[scored]
        return ObjectiveOutput(mrm_loss(scored_predictions, targets[scored], self.target), outputs)


class ItmObjective(Objective):
    """Image-text matching: does the caption describe the image? A binary classifier on the fused pooled
    outputs of the matching pass (column 1 = "matches").

    Its pairs (``pair``): the data's (``itm_negatives="data"``: TF-IDF hard or random captions, labelled by
    the dataset), or drawn here (``"in_batch"``: the batch holds matched pairs, and ``itm_negative_ratio`` of
    its captions are re-paired with another image of the batch, drawn by the similarity of the clean
    single-modal embeddings, ALBEF's hard negatives; equal ``image_index`` values are never each other's)."""

    @staticmethod
    def heads(config: InterBertConfig) -> dict:
        return {"itm_dropout": nn.Dropout(config.itm_dropout_prob), "itm_classifier": nn.Linear(config.pooled_size, 2)}

    def __init__(self, model: InterBertForPreTraining, itm_negatives: str, trains_embeddings: bool):
        self.model = model
        self.pair = self._in_batch_pairs if itm_negatives == "in_batch" else self._data_pairs
        self.trains_embeddings = trains_embeddings  # ITC is on: the pairing's embeddings keep their graph

    def logits(self, text_pooled: torch.Tensor, image_pooled: torch.Tensor) -> torch.Tensor:
        return self.model.itm_classifier(self.model.itm_dropout(fuse(text_pooled, image_pooled, self.model.config.fusion)))

    def forward(self, passes: EncoderPasses, batch: PretrainingInputs) -> ObjectiveOutput:
        pooled = passes.matching
        if pooled is None or pooled.text_pooled is None or pooled.image_pooled is None:
            return ObjectiveOutput()
        logits = self.logits(pooled.text_pooled, pooled.image_pooled)
        outputs = {"itm_logits": logits, **({"itm_labels": batch.itm_labels} if batch.repaired else {})}
        loss = None if batch.itm_labels is None else F.cross_entropy(logits, batch.itm_labels.long())
        return ObjectiveOutput(loss, outputs)

    @staticmethod
    def _data_pairs(batch: PretrainingInputs) -> PretrainingInputs:
        return batch

    def _in_batch_pairs(self, batch: PretrainingInputs) -> PretrainingInputs:
        if batch.itm_labels is None:  # a masked step: nothing to pair
            return batch
        order, labels, embeddings = self.in_batch_negatives(batch.clean_text, batch.clean_image, batch.itm_labels,
                                                            batch.image_index)
        batch = batch.with_images(order)
        return dataclasses.replace(batch, itm_labels=labels, pair_embeddings=embeddings, repaired=True)

    def in_batch_negatives(self, text: dict, image: dict, itm_labels: torch.Tensor, image_index: torch.Tensor | None):
        """``(image_order, itm_labels, (text_embedding, image_embedding))`` for a batch of matched pairs:
        caption i is to be paired with image ``image_order[i]``."""
        if not bool(itm_labels.bool().all()):
            raise ValueError("in-batch ITM negatives start from matched pairs: every itm_label must be 1")
        encoder, temperature = self.model.interbert, self.model.config.itc_temperature
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_embeddings):
            text_embedding, image_embedding = encoder.embed_text(**text), encoder.embed_images(**image)
        same = None if image_index is None else image_index[:, None] == image_index[None, :]
        similarity = (text_embedding @ image_embedding.T).detach() / temperature
        order, itm_labels = in_batch_itm_pairs(similarity, same, self.model.config.itm_negative_ratio)
        return order, itm_labels, (text_embedding, image_embedding)


class ItcObjective(Objective):
    """Image-text contrastive loss (this project's addition, ALBEF's ITC): symmetric InfoNCE between the
    single-modal embeddings of the matched pairs, which train the embeddings candidate search uses.

    Its embeddings: with in-batch ITM negatives, those the pairing drew the negatives with (the clean pairs,
    all matched); otherwise the matched pairs' of what ITM reads (``itm_inputs="clean"``: the clean caption
    and regions; ``"masked"``: the masked caption and the regions as detected), on a batch ITM scored."""

    def __init__(self, model: InterBertForPreTraining, itm_negatives: str, itm_inputs: str):
        self.model = model
        self.loss_of = self._on_pair_embeddings if itm_negatives == "in_batch" else self._on_matched_pairs
        self.clean_text = itm_inputs == "clean"

    def forward(self, passes: EncoderPasses, batch: PretrainingInputs) -> ObjectiveOutput:
        return self.loss_of(passes, batch)

    def _on_pair_embeddings(self, passes: EncoderPasses, batch: PretrainingInputs) -> ObjectiveOutput:
        if batch.pair_embeddings is None:  # nothing was paired (no ITM labels)
            return ObjectiveOutput()
        return ObjectiveOutput(contrastive_loss(*batch.pair_embeddings, self.model.config.itc_temperature))

    def _on_matched_pairs(self, passes: EncoderPasses, batch: PretrainingInputs) -> ObjectiveOutput:
        pooled = passes.matching
        if batch.itm_labels is None or pooled is None or pooled.text_pooled is None or pooled.image_pooled is None:
            return ObjectiveOutput()  # ITM scored nothing: no pairs known to match
        inputs = {**(batch.clean_text if self.clean_text else batch.text), **batch.clean_image}
        return ObjectiveOutput(self.model.interbert.contrastive_loss(inputs, batch.itm_labels.bool()))


class NoObjective(Objective):
    """An objective the config turns off (ITC at ``itc_loss_weight=0``): no loss, no head."""

    def forward(self, passes: EncoderPasses, batch: PretrainingInputs) -> ObjectiveOutput:
        return ObjectiveOutput()
