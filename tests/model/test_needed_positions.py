"""The streams' last layers compute only the positions their readers use (the poolers' first position,
the masked tokens and scored regions). What the heads and losses see must equal the full computation,
padding included, and gradients must too; only the unread sequence positions differ (zero)."""

from __future__ import annotations

import torch
from test_modeling import D, V, _pretraining_labels, small_config

from interbert.modeling import (
    InterBertForImageTextRetrieval,
    InterBertForPreTraining,
    InterBertModel,
    first_position,
    run_stack,
)


def padded_batch(seed=0):
    """Captions of 4..9 tokens and 2..6 regions: every row padded differently."""
    g = torch.Generator().manual_seed(seed)
    b, t, r = 4, 9, 6
    text_len, region_len = torch.tensor([9, 4, 7, 5]), torch.tensor([6, 2, 4, 3])
    return dict(
        input_ids=torch.randint(1, V, (b, t), generator=g) * (torch.arange(t) < text_len[:, None]),
        attention_mask=(torch.arange(t) < text_len[:, None]).long(),
        region_features=torch.randn(b, r, D, generator=g),
        region_boxes=torch.rand(b, r, 5, generator=g),
        region_mask=(torch.arange(r) < region_len[:, None]).long(),
    )


def test_last_layer_on_needed_rows_equals_the_full_stack():
    model = InterBertModel(small_config()).eval()
    b = padded_batch()
    hidden = model.embeddings(b["input_ids"], None)
    keep = b["attention_mask"].bool()
    needed = torch.zeros_like(keep)
    needed[:, 0] = True
    needed[0, 5] = needed[2, 3] = needed[3, 4] = True
    needed[1, 6] = True  # a padded position: never computed, stays zero
    full = run_stack(model.single_stream, hidden, keep)
    part = run_stack(model.single_stream, hidden, keep, needed)
    read = needed & keep
    torch.testing.assert_close(part[read], full[read], atol=1e-5, rtol=1e-5)
    assert (part[~read] == 0).all()


def test_pretraining_heads_and_losses_equal_the_full_computation():
    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config(mrm_target="classes", embedding_size=8, itc_loss_weight=1.0)).eval()
    b = padded_batch()
    labels = _pretraining_labels(4, 9, 6, itm_labels=(1, 0, 1, 1), mrm_target="classes")
    labels["msm_labels"][:, 2] = 5
    labels["msm_labels"][0, 6] = 7
    out = model(**b, **labels)
    full = model(**b, **labels, full_logits=True)  # every position computed and scored
    text_at = labels["msm_labels"] != -100
    scored = labels["mrm_mask"] & labels["itm_labels"].bool()[:, None]
    torch.testing.assert_close(out.msm_logits, full.msm_logits[text_at], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mrm_class_logits, full.mrm_class_logits[scored], atol=1e-5, rtol=1e-5)
    for name in ("itm_logits", "text_pooled", "image_pooled", "loss", "msm_loss", "mrm_loss", "itm_loss", "itc_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(full, name), atol=1e-5, rtol=1e-5)

    # the same gradients as the full computation
    grads = []
    for kwargs in ({}, {"full_logits": True}):
        model.zero_grad()
        model(**b, **labels, **kwargs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_pair_scores_and_embeddings_equal_the_full_pass():
    torch.manual_seed(0)
    model = InterBertForImageTextRetrieval(small_config(embedding_size=8)).eval()
    b = padded_batch()
    full = model.interbert(**b)
    logits, base = model.pair_scores(**b)
    torch.testing.assert_close(base.text_pooled, full.text_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.image_pooled, full.image_pooled, atol=1e-5, rtol=1e-5)
    expected = model.score(full.text_pooled * full.image_pooled).squeeze(-1)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    text_only = model.interbert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).text_pooled
    image_only = model.interbert(region_features=b["region_features"], region_boxes=b["region_boxes"],
                                 region_mask=b["region_mask"]).image_pooled
    proj = model.interbert
    torch.testing.assert_close(proj.embed_text(b["input_ids"], b["attention_mask"]),
                               torch.nn.functional.normalize(proj.text_projection(text_only), dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj.embed_images(b["region_features"], b["region_boxes"], b["region_mask"]),
                               torch.nn.functional.normalize(proj.image_projection(image_only), dim=-1), atol=1e-5, rtol=1e-5)


def test_first_position_marks_position_zero_only():
    keep = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    assert first_position(keep).tolist() == [[True, False, False], [True, False, False]]
    assert first_position(None) is None


def test_text_classifier_logits_and_gradients_equal_the_full_pass():
    from interbert.modeling import InterBertForSequenceClassification

    torch.manual_seed(0)
    model = InterBertForSequenceClassification(small_config(num_labels=3)).eval()
    b = padded_batch()
    labels = torch.tensor([0, 2, 1, 1])
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels)
    full = model.interbert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).text_sequence[:, 0]
    expected = model.classifier(torch.tanh(model.pooler(full)))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.nn.functional.cross_entropy(expected, labels).backward()
    for name, grad in got.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_needed_rows_grouped_per_sequence_equal_the_full_stack_in_training():
    """Without attention dropout the last layer lays the needed rows out as a few queries per sequence
    (``Padding.query_slots``): a sequence with several needed rows, one with none, and a batch with no
    padding at all (no attention mask) must give the full computation's rows and gradients."""
    torch.manual_seed(0)
    model = InterBertModel(small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    b = padded_batch()
    for keep in (b["attention_mask"].bool(), torch.ones(4, 9, dtype=torch.bool)):
        needed = torch.zeros_like(keep)
        needed[0, [0, 2, 5, 8]] = True  # four rows of one sequence
        needed[2, 3] = True  # sequences 1 and 3: none
        weights = torch.randn(*keep.shape, 32)
        results = []
        for n in (None, needed):
            hidden = model.embeddings(b["input_ids"], None)
            model.zero_grad()
            out = run_stack(model.single_stream, hidden, keep, n)
            (out * weights * (needed & keep)[..., None]).sum().backward()
            results.append((out[needed & keep], {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
        (full, full_grads), (part, part_grads) = results
        torch.testing.assert_close(part, full, atol=1e-6, rtol=1e-5)
        assert full_grads.keys() == part_grads.keys()
        for name in full_grads:
            torch.testing.assert_close(part_grads[name], full_grads[name], atol=1e-6, rtol=1e-5, msg=name)
