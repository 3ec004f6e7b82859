"""InterBertModel and its heads: shapes, masks, single-modal passes, checkpoints, gradients, errors."""

import pytest
import torch

from interbert.config import InterBertConfig, preset
from interbert.modeling import (
    InterBertForImageTextRetrieval,
    InterBertForMultipleChoice,
    InterBertForPreTraining,
    InterBertForSequenceClassification,
    InterBertModel,
)

D, C, V = 24, 7, 60


def small_config(**kw) -> InterBertConfig:
    base = dict(
        vocab_size=V, hidden_size=32, num_attention_heads=4, intermediate_size=48,
        num_single_stream_layers=2, num_text_stream_layers=1, num_image_stream_layers=2,
        image_num_attention_heads=2, image_intermediate_size=40, region_feature_size=D,
        num_region_classes=C, pooled_size=16, max_position_embeddings=32,
    )
    return InterBertConfig(**{**base, **kw})


def batch(b=3, t=7, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.randint(1, V, (b, t), generator=g),
        attention_mask=torch.ones(b, t, dtype=torch.long),
        region_features=torch.randn(b, r, D, generator=g),
        region_boxes=torch.rand(b, r, 5, generator=g),
        region_mask=torch.ones(b, r, dtype=torch.long),
    )


def test_presets_match_the_paper():
    base = preset("base")
    assert (base.hidden_size, base.num_attention_heads) == (768, 12)
    assert (base.num_single_stream_layers, base.num_text_stream_layers, base.num_image_stream_layers) == (6, 6, 6)
    assert (base.image_num_attention_heads, base.region_feature_size, base.num_region_classes, base.pooled_size) == (8, 2048, 1601, 1024)
    assert base.fusion == "mul"
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="fusion"):
        small_config(fusion="concat")


def test_output_shapes_and_field_names():
    model = InterBertForPreTraining(small_config()).eval()
    out = model(**batch())
    assert out.text_sequence.shape == (3, 7, 32) and out.image_sequence.shape == (3, 5, 32)
    assert out.text_pooled.shape == (3, 16) and out.image_pooled.shape == (3, 16)
    assert out.msm_logits.shape == (3, 7, V)
    assert out.mrm_class_logits.shape == (3, 5, C) and out.mrm_feature_predictions is None
    assert out.itm_logits.shape == (3, 2) and out.loss is None
    # MRM on features: the feature decoder, and no class decoder (nothing would train it)
    model = InterBertForPreTraining(small_config(mrm_target="features")).eval()
    out = model(**batch())
    assert out.mrm_feature_predictions.shape == (3, 5, D) and out.mrm_class_logits is None
    assert not hasattr(model, "mrm_class_decoder")
    with pytest.raises(ValueError, match="mrm_target"):
        small_config(mrm_target="both")


@pytest.mark.parametrize("fusion", ["mul", "sum"])
def test_padding_changes_no_valid_output(fusion):
    model = InterBertModel(small_config(fusion=fusion)).eval()
    short = batch(b=2, t=5, r=4)
    long = {k: v.clone() for k, v in short.items()}
    pad_t, pad_r = 3, 2
    long["input_ids"] = torch.cat([short["input_ids"], torch.zeros(2, pad_t, dtype=torch.long)], 1)
    long["attention_mask"] = torch.cat([short["attention_mask"], torch.zeros(2, pad_t, dtype=torch.long)], 1)
    long["region_features"] = torch.cat([short["region_features"], 5 * torch.randn(2, pad_r, D)], 1)
    long["region_boxes"] = torch.cat([short["region_boxes"], torch.rand(2, pad_r, 5)], 1)
    long["region_mask"] = torch.cat([short["region_mask"], torch.zeros(2, pad_r, dtype=torch.long)], 1)
    with torch.no_grad():
        a, b = model(**short), model(**long)
    torch.testing.assert_close(b.text_sequence[:, :5], a.text_sequence, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.image_sequence[:, :4], a.image_sequence, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.text_pooled, a.text_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.image_pooled, a.image_pooled, atol=1e-5, rtol=0)


def test_text_only_and_regions_only_passes():
    model = InterBertModel(small_config()).eval()
    full = batch()
    text = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"])
    assert text.image_sequence is None and text.text_pooled.shape == (3, 16)
    image = model(region_features=full["region_features"], region_boxes=full["region_boxes"], region_mask=full["region_mask"])
    assert image.text_sequence is None and image.image_pooled.shape == (3, 16)
    both = model(**full)
    # the single stream lets each modality see the other: joint outputs differ from single-modal ones
    assert not torch.allclose(both.text_pooled, text.text_pooled)
    # a single-modal pass does not depend on the other modality's inputs
    other = batch(seed=1)
    again = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"])
    torch.testing.assert_close(again.text_sequence, text.text_sequence)
    assert not torch.allclose(model(**{**full, "region_features": other["region_features"]}).text_pooled, both.text_pooled)


@pytest.mark.parametrize("mrm_target", ["classes", "features"])
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, mrm_target):
    model = InterBertForPreTraining(small_config(mrm_target=mrm_target)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = InterBertForPreTraining.from_pretrained(tmp_path).eval()
    assert loaded.config.mrm_target == mrm_target
    b = batch()
    with torch.no_grad():
        a, c = model(**b), loaded(**b)
    mrm = "mrm_class_logits" if mrm_target == "classes" else "mrm_feature_predictions"
    for name in ("text_sequence", "image_sequence", "msm_logits", mrm, "itm_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(c, name), atol=0, rtol=0)
    # the masked-token decoder stays tied to the word embeddings after loading
    assert loaded.msm_bias.shape == (V,)


def _pretraining_labels(b, t, r, itm_labels=(1, 0, 1), mrm_target=None):
    """MSM and MRM labels and ITM labels; MRM targets of ``mrm_target``'s kind only (as the data
    pipeline makes them), or of both kinds when None."""
    msm = torch.full((b, t), -100)
    msm[:, 2] = 5
    mrm = torch.zeros(b, r, dtype=torch.bool)
    mrm[:, 1:3] = True
    labels = dict(msm_labels=msm, mrm_mask=mrm, itm_labels=torch.tensor(itm_labels))
    if mrm_target in (None, "classes"):
        labels["mrm_class_targets"] = torch.softmax(torch.randn(b, r, C), -1)
    if mrm_target in (None, "features"):
        labels["mrm_feature_targets"] = torch.randn(b, r, D)
    return labels


def test_every_parameter_gets_a_gradient_from_the_pretraining_loss():
    model = InterBertForPreTraining(small_config()).train()
    out = model(**batch(), **_pretraining_labels(3, 7, 5))
    assert out.loss is not None and out.msm_loss > 0 and out.mrm_loss > 0 and out.itm_loss > 0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0 and "padding" not in n]
    assert zero == []


# DistributedDataParallel fails unless every parameter it trains gets a gradient on every rank in every
# step. The parameters that take no part are exactly those the model names as unused (the training loop
# freezes them): checked here for each pretraining variant, including the batches a rank's small share
# can hold (no matched pair, a single one), which in-process tests with the big batches never see.
PRETRAINING_VARIANTS = [
    # (mrm_target, embedding_size, itc_loss_weight, itm_negatives, itm_labels)
    ("classes", 8, 0.5, "data", (1, 0, 1)),
    ("features", 8, 0.5, "data", (1, 0, 1)),
    ("classes", 8, 0.5, "data", (0, 0, 0)),  # no matched pair: nothing to contrast
    ("features", 8, 0.5, "data", (0, 1, 0)),  # one matched pair: nothing to contrast either
    ("classes", 8, 0.0, "data", (1, 0, 1)),  # ITC off: the projections are unused
    ("features", 0, 0.5, "data", (1, 0, 1)),  # ITC on the pooled outputs
    ("classes", 8, 0.5, "in_batch", (1, 1, 1)),
    ("features", 8, 0.0, "in_batch", (1, 1, 1)),
    ("features", 8, 0.5, "in_batch", (1,)),  # a single caption: 0, still with a graph
]


def projection_names(model) -> set[str]:
    """The single-modal embedding projections, which only the contrastive loss trains."""
    return {n for n, _ in model.named_parameters() if n.startswith(("interbert.text_projection.", "interbert.image_projection."))}


@pytest.mark.parametrize("mrm_target,embedding_size,itc,negatives,itm_labels", PRETRAINING_VARIANTS)
def test_pretraining_gives_a_gradient_to_exactly_the_parameters_it_does_not_name_unused(
    mrm_target, embedding_size, itc, negatives, itm_labels
):
    config = small_config(mrm_target=mrm_target, embedding_size=embedding_size, itc_loss_weight=itc, itm_negatives=negatives)
    model = InterBertForPreTraining(config).train()
    b = len(itm_labels)
    labels = _pretraining_labels(b, 7, 5, itm_labels=itm_labels, mrm_target=mrm_target)
    out = model(**batch(b=b), **labels, image_index=torch.arange(b))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    unused = set(model.unused_parameter_names())
    assert with_grad == {n for n, _ in model.named_parameters()} - unused
    assert unused == (projection_names(model) if itc == 0 else set())
    assert (out.itc_loss is not None) == (itc > 0)


def test_pretraining_refuses_targets_its_mrm_head_does_not_predict():
    b = batch()
    for mrm_target, other in (("classes", "features"), ("features", "classes")):
        model = InterBertForPreTraining(small_config(mrm_target=mrm_target))
        with pytest.raises(ValueError, match=f"predicts region {mrm_target}.*mrm_target='{other}'"):
            model(**b, **_pretraining_labels(3, 7, 5, mrm_target=other))


@pytest.mark.parametrize("mrm_target", ["classes", "features"])
def test_mrm_loss_ignores_mismatched_pairs(mrm_target):
    model = InterBertForPreTraining(small_config(mrm_target=mrm_target)).eval()
    b, labels = batch(), _pretraining_labels(3, 7, 5, mrm_target=mrm_target)
    out = model(**b, **labels)
    assert out.mrm_loss > 0
    # change the targets of the mismatched pair only: the region loss must not move
    key = "mrm_class_targets" if mrm_target == "classes" else "mrm_feature_targets"
    labels2 = {**labels, key: labels[key].clone()}
    labels2[key][1] = labels2[key][1].flip(-1) if mrm_target == "classes" else labels2[key][1] + 100.0
    torch.testing.assert_close(model(**b, **labels2).mrm_loss, out.mrm_loss)
    labels2[key][0] = labels2[key][1]  # a matched pair's targets do count
    assert not torch.allclose(model(**b, **labels2).mrm_loss, out.mrm_loss)


def test_retrieval_group_loss_and_multiple_choice():
    cfg = small_config()
    ret = InterBertForImageTextRetrieval(cfg)
    out = ret(**batch(b=8), group_size=4)
    assert out.logits.shape == (8,) and out.loss.ndim == 0
    with pytest.raises(ValueError, match="group_size"):
        ret(**batch(b=6), group_size=4)
    mc = InterBertForMultipleChoice(cfg)
    b = batch(b=2 * 4)
    text = {k: b[k].view(2, 4, -1) for k in ("input_ids", "attention_mask")}
    shared = {k: b[k][:2] for k in ("region_features", "region_boxes", "region_mask")}
    out = mc(**text, **shared, labels=torch.tensor([0, 3]))
    assert out.logits.shape == (2, 4) and out.loss.ndim == 0


def test_sequence_classification_needs_no_regions():
    model = InterBertForSequenceClassification(small_config(num_labels=3))
    b = batch()
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0


def _grad_check(model, out) -> tuple[set[str], set[str]]:
    """(names of the parameters with a gradient after backward, names of all the others)"""
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    return with_grad, {n for n, _ in model.named_parameters()} - with_grad


def test_fine_tuning_heads_name_exactly_the_parameters_their_loss_does_not_reach():
    # DDP needs a gradient for every trained parameter; what a head names unused the loop freezes
    cfg = dict(embedding_size=8, num_labels=2)
    text = InterBertForSequenceClassification(small_config(**cfg))
    b = batch()
    _, without = _grad_check(text, text(input_ids=b["input_ids"], labels=torch.tensor([0, 1, 1])))
    assert without == set(text.unused_parameter_names())
    assert {n.split(".")[1] for n in without} == {"region_embeddings", "image_stream", "image_pooler", "text_pooler",
                                                  "text_projection", "image_projection"}
    for itc in (0.0, 1.0):
        retrieval = InterBertForImageTextRetrieval(small_config(**cfg, itc_loss_weight=itc))
        _, without = _grad_check(retrieval, retrieval(**batch(b=4), group_size=4))  # one group: ITC over 1 pair
        assert without == set(retrieval.unused_parameter_names()) == (projection_names(retrieval) if itc == 0 else set())
    choice = InterBertForMultipleChoice(small_config(**cfg))
    b = batch(b=2 * 4)
    out = choice(**{k: b[k].view(2, 4, -1) for k in ("input_ids", "attention_mask")},
                 **{k: b[k][:2] for k in ("region_features", "region_boxes", "region_mask")}, labels=torch.tensor([0, 3]))
    _, without = _grad_check(choice, out)
    assert without == set(choice.unused_parameter_names()) == projection_names(choice)  # no ITC here


def test_clear_errors_on_wrong_shapes():
    model = InterBertModel(small_config())
    b = batch()
    with pytest.raises(ValueError, match="region_features must be batch x regions x 24"):
        model(**{**b, "region_features": torch.randn(3, 5, 25)})
    with pytest.raises(ValueError, match="region_boxes must be"):
        model(**{**b, "region_boxes": torch.rand(3, 5, 4)})
    with pytest.raises(ValueError, match="different batch sizes"):
        model(**{**b, "input_ids": b["input_ids"][:2], "attention_mask": b["attention_mask"][:2]})
    with pytest.raises(ValueError, match="attention_mask"):
        model(**{**b, "attention_mask": b["attention_mask"][:, :3]})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="give input_ids"):
        model()


def test_single_modal_embeddings_and_contrastive_loss():
    model = InterBertForPreTraining(small_config(embedding_size=8, itc_loss_weight=0.5)).train()
    b = batch(b=4)
    text = model.interbert.embed_text(b["input_ids"], b["attention_mask"])
    image = model.interbert.embed_images(b["region_features"], b["region_boxes"], b["region_mask"])
    assert text.shape == image.shape == (4, 8)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    out = model(**b, itm_labels=torch.tensor([1, 1, 0, 1]))
    assert out.itc_loss is not None and out.itc_loss > 0
    torch.testing.assert_close(out.loss, out.itm_loss + 0.5 * out.itc_loss)
    out.loss.backward()
    assert model.interbert.text_projection.weight.grad.abs().sum() > 0

    ret = InterBertForImageTextRetrieval(small_config(embedding_size=8, itc_loss_weight=1.0))
    out = ret(**batch(b=8), group_size=4)
    assert out.itc_loss is not None and out.loss > out.itc_loss


def test_in_batch_negatives_pair_captions_with_other_pictures_of_the_batch():
    config = small_config(embedding_size=8, itc_loss_weight=0.5, itm_negatives="in_batch", itm_negative_ratio=1.0)
    model = InterBertForPreTraining(config).eval()
    b = batch(b=4)
    for key in ("region_features", "region_boxes"):
        b[key][1] = b[key][0]  # captions 0 and 1 describe the same picture
    labels = {**_pretraining_labels(4, 7, 5), "itm_labels": torch.ones(4, dtype=torch.long)}
    image_index = torch.tensor([0, 0, 1, 2])
    out = model(**b, **labels, image_index=image_index)
    assert out.itm_labels.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(out.itm_loss, torch.nn.functional.cross_entropy(out.itm_logits, out.itm_labels))
    assert out.mrm_loss == 0  # the regions of a mismatched pair are not scored
    # row i's ITM logits are those of caption i with one of the *other* pictures (found by trying them)
    data_mode = InterBertForPreTraining(small_config(embedding_size=8)).eval()
    data_mode.load_state_dict(model.state_dict())
    for i in range(4):
        matches = []
        for j in range(4):
            pair = {k: v[[i]] for k, v in b.items() if k.startswith("input") or k == "attention_mask"}
            pair.update({k: b[k][[j]] for k in ("region_features", "region_boxes", "region_mask")})
            if torch.allclose(data_mode(**pair).itm_logits[0], out.itm_logits[i], atol=1e-5):
                matches.append(int(image_index[j]))
        assert matches and image_index[i].item() not in matches

    # ratio 0: every caption keeps its image, exactly the data-mode forward
    model.config.itm_negative_ratio = 0.0
    kept = model(**b, **labels, image_index=image_index)
    assert kept.itm_labels.tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(kept.itm_logits, data_mode(**b, **labels).itm_logits)
    with pytest.raises(ValueError, match="every itm_label must be 1"):
        model(**b, **{**labels, "itm_labels": torch.tensor([1, 0, 1, 1])})
    # training: the contrastive loss trains the embeddings that choose the negatives
    model.config.itm_negative_ratio = 0.5
    out = model.train()(**b, **labels, image_index=image_index)
    out.loss.backward()
    assert out.itc_loss > 0 and model.interbert.text_projection.weight.grad.abs().sum() > 0


def test_config_refuses_unknown_itm_negatives():
    with pytest.raises(ValueError, match="itm_negatives"):
        small_config(itm_negatives="tfidf")
