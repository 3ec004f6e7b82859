"""Each pretraining objective alone (interbert.objectives), on tiny hand-made tensors: the positions and
pairs it selects, and its loss where the head is set to give a known value. The whole step against the
recorded one: test_objectives_equivalence.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_modeling import C, D, V, batch, small_config

from interbert.modeling import EncoderPasses, InterBertForPreTraining, InterBertOutput, PassPlan
from interbert.objectives import (
    IGNORE,
    ItcObjective,
    ItmObjective,
    MrmObjective,
    MsmObjective,
    NoObjective,
    PretrainingInputs,
    contrastive_loss,
)

H = 32  # small_config's hidden size


def model_of(**overrides) -> InterBertForPreTraining:
    torch.manual_seed(0)
    return InterBertForPreTraining(small_config(**overrides)).eval()


def inputs_of(b=2, t=3, r=4, **labels) -> PretrainingInputs:
    """A batch as the objectives read it (the same dicts for the given and the clean inputs)."""
    raw = batch(b, t, r)
    text = {k: raw[k] for k in ("input_ids", "attention_mask")} | {"token_type_ids": None}
    image = {k: raw[k] for k in ("region_features", "region_boxes", "region_mask")}
    return PretrainingInputs(text, text, image, image, **labels)


def passes_of(text_sequence=None, image_sequence=None, pooled=None) -> EncoderPasses:
    masked = InterBertOutput(text_sequence=text_sequence, image_sequence=image_sequence)
    return EncoderPasses(masked, lambda: pooled)


def silence(transform) -> None:
    """A head transform that outputs zeros: the decoder's logits are then its bias, a value set by hand."""
    with torch.no_grad():
        transform.LayerNorm.weight.zero_()
        transform.LayerNorm.bias.zero_()


# -- MSM ---------------------------------------------------------------------------------------------
MSM_LABELS = torch.tensor([[IGNORE, 5, IGNORE], [7, IGNORE, 9]])


@pytest.mark.parametrize("msm_pairs, expected_rows", [("all", [1, 2]), ("matched", [1, 0])])
def test_msm_selects_the_masked_tokens_of_the_pairs_it_scores(msm_pairs, expected_rows):
    msm = MsmObjective(model_of(), msm_pairs)
    with_itm = inputs_of(msm_labels=MSM_LABELS, itm_labels=torch.tensor([1, 0]))
    positions = msm.positions(with_itm)
    assert positions.sum(dim=1).tolist() == expected_rows
    assert (msm.targets(with_itm)[positions] != IGNORE).all()
    # a masked step (no ITM labels) scores every pair; full_logits or no labels: every position
    assert msm.positions(inputs_of(msm_labels=MSM_LABELS)).sum().item() == 3
    assert msm.positions(inputs_of(msm_labels=MSM_LABELS, full_logits=True)) is None
    assert msm.positions(inputs_of()) is None and msm.targets(inputs_of()) is None


def test_msm_loss_with_uniform_logits_is_log_vocabulary_size():
    model = model_of()
    silence(model.msm_transform)  # logits = msm_bias = 0: uniform over the vocabulary
    msm = MsmObjective(model, "all")
    out = msm(passes_of(text_sequence=torch.randn(2, 3, H)), inputs_of(msm_labels=MSM_LABELS))
    assert out.outputs["msm_logits"].shape == (3, V)  # the masked tokens only
    assert out.loss.item() == pytest.approx(math.log(V), rel=1e-6)


def test_msm_loss_is_cross_entropy_of_the_tied_decoder_at_the_masked_tokens():
    model = model_of()
    with torch.no_grad():
        model.msm_bias.normal_()
    sequence = torch.randn(2, 3, H)
    out = MsmObjective(model, "all")(passes_of(text_sequence=sequence), inputs_of(msm_labels=MSM_LABELS))
    at = MSM_LABELS != IGNORE
    logits = model.msm_transform(sequence[at]) @ model.interbert.embeddings.word_embeddings.weight.T + model.msm_bias
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, MSM_LABELS[at]))


def test_msm_without_masked_tokens_or_without_a_masked_pass():
    msm = MsmObjective(model_of(), "matched")
    # the only masked tokens are a mismatched pair's: zero, with a graph (DDP needs every head's gradient)
    labels = torch.tensor([[IGNORE] * 3, [7, IGNORE, IGNORE]])
    out = msm(passes_of(text_sequence=torch.randn(2, 3, H)), inputs_of(msm_labels=labels, itm_labels=torch.tensor([1, 0])))
    assert out.loss.item() == 0 and out.loss.requires_grad
    # a matching step has no masked pass: nothing to predict, nothing logged
    matching_step = EncoderPasses(None, lambda: InterBertOutput())
    assert msm(matching_step, inputs_of(itm_labels=torch.tensor([1, 0]))).loss is None
    # inference: logits at every position, no loss
    out = msm(passes_of(text_sequence=torch.randn(2, 3, H)), inputs_of())
    assert out.loss is None and out.outputs["msm_logits"].shape == (2, 3, V)


# -- MRM ---------------------------------------------------------------------------------------------
MRM_MASK = torch.tensor([[False, True, True, False], [False, True, False, False]])


def test_mrm_scores_the_masked_regions_of_matched_pairs_only():
    mrm = MrmObjective(model_of(), "classes")
    scored = mrm.scored(inputs_of(mrm_mask=MRM_MASK, itm_labels=torch.tensor([1, 0])))
    assert scored.tolist() == [[False, True, True, False], [False, False, False, False]]
    assert mrm.scored(inputs_of(mrm_mask=MRM_MASK)).equal(MRM_MASK)  # a masked step: every pair is its own
    assert mrm.positions(inputs_of(mrm_mask=MRM_MASK, full_logits=True)) is None
    assert mrm.scored(inputs_of()) is None


def test_mrm_class_loss_is_zero_at_the_target_distribution_and_log_c_from_uniform_to_one_hot():
    model = model_of(mrm_target="classes")
    silence(model.mrm_transform)  # predictions = the decoder's bias
    mrm = MrmObjective(model, "classes")
    target = torch.softmax(torch.randn(C), -1)
    with torch.no_grad():
        model.mrm_class_decoder.bias.copy_(target.log())
    sequence = torch.randn(2, 4, H)
    same = inputs_of(mrm_mask=MRM_MASK, mrm_class_targets=target.expand(2, 4, C))
    out = mrm(passes_of(image_sequence=sequence), same)
    assert out.outputs["mrm_class_logits"].shape == (3, C) and abs(out.loss.item()) < 1e-6
    with torch.no_grad():
        model.mrm_class_decoder.bias.zero_()
    one_hot = F.one_hot(torch.zeros(2, 4, dtype=torch.long), C).float()
    out = mrm(passes_of(image_sequence=sequence), inputs_of(mrm_mask=MRM_MASK, mrm_class_targets=one_hot))
    assert out.loss.item() == pytest.approx(math.log(C), rel=1e-6)


def test_mrm_feature_loss_is_the_mean_squared_error_and_targets_of_the_other_kind_are_refused():
    model = model_of(mrm_target="features")
    silence(model.mrm_transform)
    with torch.no_grad():
        model.mrm_feature_decoder.bias.zero_()  # predictions 0: the loss is the targets' mean square
    mrm = MrmObjective(model, "features")
    targets = torch.randn(2, 4, D)
    out = mrm(passes_of(image_sequence=torch.randn(2, 4, H)), inputs_of(mrm_mask=MRM_MASK, mrm_feature_targets=targets))
    assert "mrm_class_logits" not in out.outputs
    torch.testing.assert_close(out.loss, targets[MRM_MASK].pow(2).mean())
    with pytest.raises(ValueError, match="predicts region features.*mrm_target='classes'"):
        mrm(passes_of(image_sequence=torch.randn(2, 4, H)), inputs_of(mrm_mask=MRM_MASK))


# -- ITM ---------------------------------------------------------------------------------------------
def test_itm_with_a_silent_classifier_is_log_2_and_reads_the_matching_pass():
    model = model_of()
    with torch.no_grad():
        model.itm_classifier.weight.zero_()
        model.itm_classifier.bias.zero_()
    itm = ItmObjective(model, "data", trains_embeddings=False)
    pooled = InterBertOutput(text_pooled=torch.randn(2, 16), image_pooled=torch.randn(2, 16))
    out = itm(passes_of(pooled=pooled), inputs_of(itm_labels=torch.tensor([1, 0])))
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert set(out.outputs) == {"itm_logits"}  # the data's labels are not repeated in the output
    assert itm(passes_of(pooled=None), inputs_of(itm_labels=torch.tensor([1, 0]))).loss is None  # nothing to read
    assert itm(passes_of(pooled=pooled), inputs_of()).loss is None  # inference: logits only


def test_itm_pairs_of_the_data_are_the_batch_and_in_batch_pairs_take_other_images():
    model = model_of(embedding_size=8, itm_negative_ratio=1.0)
    batch_ = inputs_of(b=4, itm_labels=torch.ones(4, dtype=torch.long), image_index=torch.arange(4),
                       mrm_mask=torch.rand(4, 4) < 0.5)
    assert ItmObjective(model, "data", trains_embeddings=False).pair(batch_) is batch_
    paired = ItmObjective(model, "in_batch", trains_embeddings=True).pair(batch_)
    assert paired.repaired and paired.itm_labels.tolist() == [0, 0, 0, 0]
    order = [next(j for j in range(4) if paired.image["region_features"][i].equal(batch_.image["region_features"][j]))
             for i in range(4)]
    assert all(j != i for i, j in enumerate(order))  # every caption with another picture
    assert paired.mrm_mask.equal(batch_.mrm_mask[order]) and paired.text is batch_.text  # the image side moves
    assert all(e.requires_grad for e in paired.pair_embeddings)  # ITC trains the embeddings that drew them
    # captions of the same picture are never each other's negatives; a batch with a mismatched pair is refused
    same = ItmObjective(model, "in_batch", trains_embeddings=False).pair(
        PretrainingInputs(**{**batch_.__dict__, "image_index": torch.zeros(4, dtype=torch.long)}))
    assert same.itm_labels.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="every itm_label must be 1"):
        ItmObjective(model, "in_batch", trains_embeddings=False).pair(
            PretrainingInputs(**{**batch_.__dict__, "itm_labels": torch.tensor([1, 0, 1, 1])}))


# -- ITC ---------------------------------------------------------------------------------------------
def test_contrastive_loss_of_orthonormal_pairs_has_its_closed_form():
    e = torch.eye(3)
    # each row's logits: 1/T at its pair, 0 elsewhere
    for temperature in (1.0, 0.5):
        expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 2))
        assert contrastive_loss(e, e, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_itc_takes_the_matched_pairs_of_what_itm_reads_or_the_pairing_embeddings():
    model = model_of(embedding_size=8, itc_loss_weight=1.0)
    labels = torch.tensor([1, 0, 1])
    inputs = inputs_of(b=3, itm_labels=labels)
    pooled = InterBertOutput(text_pooled=torch.randn(3, 16), image_pooled=torch.randn(3, 16))
    got = ItcObjective(model, "data", "clean")(passes_of(pooled=pooled), inputs).loss
    rows = labels.bool()
    base = model.interbert
    text = base.embed_text(inputs.text["input_ids"][rows], inputs.text["attention_mask"][rows])
    image = base.embed_images(*(inputs.image[k][rows] for k in ("region_features", "region_boxes", "region_mask")))
    torch.testing.assert_close(got, contrastive_loss(text, image, model.config.itc_temperature))
    # no ITM scoring (a masked step, or nothing pooled): nothing known to match
    assert ItcObjective(model, "data", "clean")(passes_of(pooled=pooled), inputs_of(b=3)).loss is None
    assert ItcObjective(model, "data", "clean")(passes_of(pooled=None), inputs).loss is None
    # in-batch negatives: the embeddings that drew them
    e = torch.eye(3, 8)
    mined = PretrainingInputs(**{**inputs.__dict__, "pair_embeddings": (e, e)})
    torch.testing.assert_close(ItcObjective(model, "in_batch", "clean")(passes_of(), mined).loss,
                               contrastive_loss(e, e, model.config.itc_temperature))
    assert ItcObjective(model, "in_batch", "clean")(passes_of(), inputs).loss is None
    assert NoObjective()(passes_of(), mined).loss is None


# -- the pass plan and the model's objectives ------------------------------------------------------------
def counting(encoder) -> list:
    """Record the needed positions of every encoder pass."""
    calls, encode = [], encoder.encode

    def spy(*args, **kwargs):
        calls.append((kwargs.get("text_needed"), kwargs.get("image_needed")))
        return encode(*args, **kwargs)

    encoder.encode = spy
    return calls


@pytest.mark.parametrize("itm_inputs", ["masked", "clean"])
def test_the_pass_plan_runs_the_passes_the_step_reads(itm_inputs):
    model = model_of(itm_inputs=itm_inputs)
    plan, calls = PassPlan(model.interbert, itm_inputs), counting(model.interbert)
    msm_labels = torch.tensor([[IGNORE, 5, IGNORE], [IGNORE, IGNORE, 9]])
    text_at = msm_labels != IGNORE
    # a joint step: the masked pass at the masked tokens and position 0; clean mode adds a pooled pass
    passes = plan.run(inputs_of(msm_labels=msm_labels, itm_labels=torch.tensor([1, 0])), text_at, None)
    assert (passes.masked.text_sequence[~(text_at | F.one_hot(torch.zeros(2, dtype=torch.long), 3).bool())] == 0).all()
    assert (passes.matching is passes.masked) == (itm_inputs == "masked") and len(calls) == (1 if itm_inputs == "masked" else 2)
    assert calls[0][0].equal(text_at | torch.tensor([[True, False, False]] * 2)) and calls[0][1] is None
    # a masked step: in clean mode nothing reads a matching pass
    calls.clear()
    passes = plan.run(inputs_of(msm_labels=msm_labels), text_at, None)
    assert (passes.matching is None) == (itm_inputs == "clean") and len(calls) == 1
    # a matching step: one pass, position 0 only
    calls.clear()
    passes = plan.run(inputs_of(itm_labels=torch.tensor([1, 0])), None, None)
    assert passes.masked is None and passes.matching.text_pooled is not None and len(calls) == 1
    assert calls[0][0][:, 1:].sum() == 0


def test_the_objectives_heads_are_the_models_parameters_under_their_checkpoint_names():
    model = model_of(mrm_target="features", embedding_size=8, itc_loss_weight=0.5)
    heads = {"msm_transform", "msm_bias", "mrm_transform", "mrm_feature_decoder", "itm_dropout", "itm_classifier"}
    assert heads <= set(dir(model)) and not hasattr(model, "mrm_class_decoder")
    top = {name.split(".")[0] for name in model.state_dict()}
    assert top == {"interbert", *heads} - {"itm_dropout"}  # the objectives themselves hold nothing saved
    assert isinstance(model.itc, ItcObjective) and isinstance(model_of().itc, NoObjective)


def test_a_copied_or_loaded_model_objectives_read_its_own_heads(tmp_path):
    """The objectives reach their heads through the model: a deep copy (EMA, pickling) or a model loaded
    from a folder (parameters replaced in place of the initial ones) must read its own, not the original's."""
    import copy

    model = model_of(itm_inputs="clean", embedding_size=8, itc_loss_weight=0.5)
    inputs = {**batch(), "itm_labels": torch.tensor([1, 0, 1])}
    copied = copy.deepcopy(model)
    assert copied.msm.model is copied and copied.passes.encoder is copied.interbert
    with torch.no_grad():
        model.itm_classifier.weight.add_(1.0)
    assert not torch.allclose(copied(**inputs).itm_logits, model(**inputs).itm_logits)
    model.save_pretrained(tmp_path)
    loaded = InterBertForPreTraining.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(**inputs).itm_logits, model(**inputs).itm_logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded(**inputs).msm_logits, model(**inputs).msm_logits, rtol=0, atol=0)
