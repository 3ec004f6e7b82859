"""Static shapes for a compiled step (issue 26): length buckets that change no result, a static-shape mode
that gives the default mode's losses and pooled outputs, and a forward that torch._dynamo captures as one
graph for every pretraining variant and every fine-tuning task.

``torch._dynamo.explain`` traces only (no inductor), so these run in seconds on a CPU."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))  # test_modeling, test_objectives_equivalence
from test_modeling import C, D, V, small_config  # noqa: E402
from test_objectives_equivalence import CONFIGS, WEIGHTS, batch_for  # noqa: E402

from interbert.data.batches import (  # noqa: E402
    bucket_edges,
    bucket_length,
    collate,
    masked_count_budgets,
    masked_positions,
)
from interbert.modeling import (  # noqa: E402
    InterBertForImageTextRetrieval,
    InterBertForMultipleChoice,
    InterBertForPreTraining,
    InterBertForSequenceClassification,
)

LOSSES = ("loss", "msm_loss", "mrm_loss", "itm_loss", "itc_loss")


# ---- bucket edges ---------------------------------------------------------------------------------
def test_auto_edges_are_quantiles_rounded_up_to_8_and_cover_the_longest():
    lengths = [5, 9, 12, 13, 20, 22, 30, 33]
    edges = bucket_edges(lengths)
    assert edges == [16, 24, 32, 33]  # quartiles 12, 20, 30 rounded up; the last one is the longest itself
    assert len(bucket_edges(list(range(1, 500)))) <= 4
    assert bucket_edges([7] * 10) == [7]  # one length: one bucket, never above it
    assert bucket_edges(list(range(3, 37)))[-1] == 36
    with pytest.raises(ValueError):
        bucket_edges([])


def test_a_batch_pads_to_the_smallest_edge_that_fits():
    assert bucket_length(17, [16, 24, 32]) == 24
    assert bucket_length(16, [16, 24, 32]) == 16
    assert bucket_length(40, [16, 24, 32]) == 40  # longer than every edge: its own length
    assert bucket_length(9, None) == 9


def _examples(b: int = 4, seed: int = 3) -> list[dict]:
    """Pretraining examples as the dataset makes them: captions of 4..9 tokens, 3..6 regions, masked."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (t, r) in enumerate(zip([9, 4, 7, 5], [6, 3, 4, 6])):
        ids = rng.integers(4, V, t)
        ids[0] = 2
        labels = np.full(t, -100)
        labels[1] = ids[1]
        ids[1] = 3
        mrm = np.zeros(r, bool)
        mrm[1] = True
        features = rng.standard_normal((r, D)).astype(np.float32)
        out.append({"input_ids": ids, "msm_labels": labels, "region_features": features * ~mrm[:, None],
                    "region_boxes": rng.random((r, 5)).astype(np.float32), "mrm_mask": mrm,
                    "mrm_class_targets": rng.dirichlet(np.ones(C), r).astype(np.float32),
                    "mrm_feature_targets": features, "itm_labels": int(i % 2 == 0),
                    "image_id": f"img{i}", "caption_id": f"cap{i}"})
    return out[:b]


def test_collate_with_buckets_pads_inputs_labels_and_masks():
    batch = collate(_examples(), length_buckets=[8, 16], region_buckets=[8])
    assert batch["input_ids"].shape == (4, 16) and batch["region_features"].shape == (4, 8, D)
    assert batch["attention_mask"].sum(1).tolist() == [9, 4, 7, 5]
    assert batch["region_mask"].sum(1).tolist() == [6, 3, 4, 6]
    assert (batch["msm_labels"][:, 9:] == -100).all() and not batch["mrm_mask"][:, 6:].any()


# ---- the masked-token budget ----------------------------------------------------------------------
def test_collate_gives_the_masked_positions_padded_to_the_bucket_budget():
    examples = _examples()  # one masked token each, at position 1; texts padded to 16
    batch = collate(examples, length_buckets=[8, 16], region_buckets=[8], msm_budgets={8: 8, 16: 8})
    assert batch["msm_positions"].tolist() == [1, 17, 33, 49, -1, -1, -1, -1]  # b * 16 + 1, then NO_POSITION
    assert batch["msm_positions"].dtype == torch.long
    # more masked tokens than the budget: the full B x T, the one other shape of the bucket
    over = collate(examples, length_buckets=[16], msm_budgets={16: 2})["msm_positions"]
    assert over.shape == (4 * 16,) and over[:4].tolist() == [1, 17, 33, 49] and (over[4:] == -1).all()
    assert "msm_positions" not in collate(examples, length_buckets=[16])  # no budgets: no key, as before
    matching = [{k: v for k, v in e.items() if k not in ("msm_labels", "mrm_mask")} for e in examples]
    assert "msm_positions" not in collate(matching, length_buckets=[16], msm_budgets={16: 8})  # nothing masked


def test_a_budget_is_never_above_b_x_t_and_a_length_without_one_takes_b_x_t():
    labels = torch.full((2, 4), -100)
    labels[:, 1:3] = 7
    assert masked_positions(labels, {4: 100}).tolist() == [1, 2, 5, 6, -1, -1, -1, -1]  # capped at 2 x 4
    assert masked_positions(labels, {8: 4}).shape == (8,)  # length 4 has no budget: 2 x 4


def test_budgets_hold_the_quantile_of_random_batches_of_each_bucket():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 37, 3000)
    counts = rng.integers(1, lengths + 1)  # the original's span: up to the whole caption
    edges = [16, 24, 32, 36]
    budgets = masked_count_budgets(lengths, counts, 32, edges)
    assert set(budgets) == set(edges) and all(v % 8 == 0 and v <= 32 * e for e, v in budgets.items())
    batches = rng.integers(0, len(lengths), (2000, 32))  # fresh batches, as the loop draws them
    in_36 = lengths[batches].max(1) > 32
    fit = counts[batches].sum(1)[in_36] <= budgets[36]
    assert 0.97 < fit.mean() < 1.0  # the typical budget holds ~99% of them; the rest take B x T
    assert budgets[36] < 0.5 * 32 * 36  # a per-batch budget is tight: ~ a third of the positions
    assert masked_count_budgets([4] * 10, [4] * 10, 2, [4]) == {4: 8}  # every token masked: B x T itself
    with pytest.raises(ValueError, match="as many masked counts as lengths"):
        masked_count_budgets([4, 5], [1], 2, [8])


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) or k == "group_size"}


def _close(a, b, where: str, atol: float = 1e-6):
    assert (a is None) == (b is None), where
    if a is not None:
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=where)


# ---- bucketed = unpadded -------------------------------------------------------------------------
@pytest.mark.parametrize("static", [False, True], ids=["default", "static"])
@pytest.mark.parametrize("variant", ["clean-data-classes-all-itc_proj", "masked-data-features-matched-itc_off"])
def test_a_bucketed_pretraining_batch_gives_the_unpadded_losses_and_outputs(variant, static):
    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config(**CONFIGS[variant], **WEIGHTS)).eval().set_static_shapes(static)
    examples = _examples()
    tight = model(**_model_inputs(collate(examples)))
    padded = model(**_model_inputs(collate(examples, length_buckets=[16, 24], region_buckets=[8, 16])))
    for name in (*LOSSES, "text_pooled", "image_pooled", "itm_logits"):
        _close(getattr(tight, name), getattr(padded, name), name)
    if not static:  # the masked positions' logits, in the same order (static mode returns every position)
        _close(tight.msm_logits, padded.msm_logits, "msm_logits")


@pytest.mark.parametrize("static", [False, True], ids=["default", "static"])
def test_a_bucketed_retrieval_batch_gives_the_unpadded_loss_and_scores(static):
    torch.manual_seed(0)
    model = InterBertForImageTextRetrieval(small_config(embedding_size=8, itc_loss_weight=0.5)).eval()
    model.set_static_shapes(static)
    groups = [[{k: e[k] for k in ("input_ids", "region_features", "region_boxes", "image_id", "caption_id")}
               for e in _examples(seed=s)] for s in range(2)]  # 2 groups of 4 pairs
    tight = model(**_model_inputs(collate(groups)))
    padded = model(**_model_inputs(collate(groups, length_buckets=[24], region_buckets=[8, 16])))
    for name in ("loss", "itc_loss", "logits", "text_pooled", "image_pooled"):
        _close(getattr(tight, name), getattr(padded, name), name)


# ---- static mode = default mode ------------------------------------------------------------------
def _with_budget(inputs: dict, budget: str | None) -> dict:
    """``inputs`` with ``msm_positions`` as collate makes them: a budget the batch fits in (``typical``), or one
    it exceeds (``over``: the full B x T, the rare batch)."""
    if budget is None or "msm_labels" not in inputs:
        return inputs
    b, t = inputs["msm_labels"].shape
    typical = 24 if budget == "typical" else 1
    assert budget == "over" or int((inputs["msm_labels"] != -100).sum()) <= typical
    return {**inputs, "msm_positions": masked_positions(inputs["msm_labels"], {t: typical})}


@pytest.mark.parametrize("kind", ["joint", "masked_step", "matching_step", "no_matched", "single", "nothing_masked"])
@pytest.mark.parametrize("variant", ["clean-data-classes-matched-itc_proj", "masked-data-features-all-itc_pooled",
                                     "masked-data-classes-all-itc_off", "fusion_sum"])
def test_static_mode_gives_the_default_losses_pooled_outputs_and_gradients(variant, kind):
    """... with and without the masked-token budget, and for a batch above its typical budget."""
    def run(static: bool, budget: str | None = None):
        torch.manual_seed(0)
        model = InterBertForPreTraining(small_config(**CONFIGS[variant], **WEIGHTS)).set_static_shapes(static)
        inputs, _ = batch_for(kind, CONFIGS[variant])
        model.eval()  # dropout off: the two modes draw their masks over different shapes
        out = model(**_with_budget(inputs, budget))
        if out.loss is not None:
            out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    default, default_grads = run(False)
    for static, static_grads in (run(True), run(True, "typical"), run(True, "over")):
        for name in (*LOSSES, "text_pooled", "image_pooled", "itm_logits"):
            _close(getattr(default, name), getattr(static, name), name, atol=2e-6)
        # a parameter no loss reaches keeps no gradient in either mode (DDP's unused-parameter contract)
        assert sorted(default_grads) == sorted(static_grads)
        for name, grad in default_grads.items():
            torch.testing.assert_close(static_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_budget_runs_the_msm_head_on_its_rows_only():
    config = CONFIGS["masked-data-classes-all-itc_off"]
    model = InterBertForPreTraining(small_config(**config, **WEIGHTS)).eval().set_static_shapes(True)
    inputs, _ = batch_for("joint", config)
    labels = inputs["msm_labels"]
    budgeted = _with_budget(inputs, "typical")
    out, full = model(**budgeted), model(**inputs)
    assert out.msm_logits.shape == (24, V) and full.msm_logits.shape == (*labels.shape, V)
    masked = (labels != -100).flatten()
    n = int(masked.sum())  # the budget's rows are the masked tokens in row-major order, then the padding
    torch.testing.assert_close(out.msm_logits[:n], full.msm_logits.flatten(0, 1)[masked], rtol=0, atol=1e-6)
    # full_logits asks for every position: the budget is not used
    assert model(**budgeted, full_logits=True).msm_logits.shape == (*labels.shape, V)
    # the default mode does not read the key: its masked tokens' logits, as without it
    model.set_static_shapes(False)
    torch.testing.assert_close(model(**budgeted).msm_logits, model(**inputs).msm_logits, rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    (lambda p, b, t: p.int(), "1-d long tensor"),
    (lambda p, b, t: p[None], "1-d long tensor"),
    (lambda p, b, t: torch.cat([p[:-1], p.new_tensor([b * t])]), r"must lie in \[0, 54\)"),
    (lambda p, b, t: p[1:], "leave out 1 masked token"),
])
def test_a_hand_made_budget_that_would_change_the_loss_is_refused_in_one_line(change, message):
    config = CONFIGS["masked-data-classes-all-itc_off"]
    model = InterBertForPreTraining(small_config(**config, **WEIGHTS)).eval().set_static_shapes(True)
    inputs = _with_budget(batch_for("joint", config)[0], "typical")
    b, t = inputs["msm_labels"].shape
    with pytest.raises(ValueError, match=message) as refused:
        model(**{**inputs, "msm_positions": change(inputs["msm_positions"], b, t)})
    assert "\n" not in str(refused.value)


# ---- no graph breaks -----------------------------------------------------------------------------
# Breaks kept, each with why. In-batch ITM negatives draw each caption's negative image with
# torch.multinomial on the drawn rows only; drawing for every row (a static shape) would consume the random
# stream differently and change which negatives a seed gives, i.e. the numbers. And the pairing refuses a
# batch that is not all matched pairs, which needs the labels on the host.
EXPECTED_BREAKS = {
    "in_batch": {
        "Tensor.item()": "in_batch_negatives checks on the host that every itm_label is 1 (a clear error)",
        "Dynamic shape operator": "in_batch_itm_pairs draws negatives for the drawn rows only (nonzero): "
                                  "the seed's draws, kept as recorded",
    },
}


def _break_reasons(model, inputs: dict) -> list[str]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_break_count == 0 or reasons, "breaks without a reason"
    return reasons if explained.graph_break_count else []


@pytest.fixture(autouse=True)
def _quiet_dynamo():
    level = logging.getLogger("torch._dynamo").level
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    yield
    logging.getLogger("torch._dynamo").setLevel(level)


# Every value of every variant setting (itm_inputs, itm_negatives, mrm_target, msm_pairs, ITC off / projected /
# pooled, fusion) appears in one of these; they trace in the default run, the other 42 combinations with -m slow.
COVERING_VARIANTS = {"masked-data-classes-all-itc_off", "clean-data-classes-all-itc_proj",
                     "clean-data-features-matched-itc_pooled", "masked-data-features-matched-itc_proj", "fusion_sum",
                     "clean-in_batch-classes-all-itc_proj", "masked-in_batch-features-matched-itc_off"}


@pytest.mark.parametrize("budget", [None, "typical"], ids=["no_budget", "budget"])
@pytest.mark.parametrize("variant", [v if v in COVERING_VARIANTS else pytest.param(v, marks=pytest.mark.slow)
                                     for v in sorted(CONFIGS)])
def test_every_pretraining_variant_captures_as_one_graph(variant, budget):
    config = CONFIGS[variant]
    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config(**config, **WEIGHTS)).train().set_static_shapes(True)
    inputs = _with_budget(batch_for("joint", config)[0], budget)
    reasons = _break_reasons(model, inputs)
    expected = EXPECTED_BREAKS["in_batch"] if config.get("itm_negatives") == "in_batch" else {}
    unexpected = [r.splitlines()[0] for r in reasons if not any(key in r for key in expected)]
    assert not unexpected, f"{variant}: graph breaks {unexpected}"


def test_the_default_mode_breaks_and_static_mode_does_not():
    """The test above can fail: the default mode (row selection, host checks) does break the graph."""
    config = CONFIGS["masked-data-classes-all-itc_off"]  # the fewest breaks of the default mode: the fastest to trace
    model = InterBertForPreTraining(small_config(**config, **WEIGHTS)).train()
    inputs, _ = batch_for("joint", config)
    assert len(_break_reasons(model, inputs)) > 0
    assert _break_reasons(model.set_static_shapes(True), inputs) == []


def _finetuning_cases():
    g = torch.Generator().manual_seed(0)
    b, t, r = 4, 9, 6
    keep_t, keep_r = torch.arange(t) < torch.tensor([9, 4, 7, 5])[:, None], torch.arange(r) < torch.tensor([6, 3, 4, 6])[:, None]
    pairs = dict(input_ids=torch.randint(4, V, (b, t), generator=g) * keep_t, attention_mask=keep_t.long(),
                 region_features=torch.randn(b, r, D, generator=g), region_boxes=torch.rand(b, r, 5, generator=g),
                 region_mask=keep_r.long())
    choices = {k: v.view(2, 2, *v.shape[1:]) for k, v in pairs.items()}
    return {
        "retrieval": (InterBertForImageTextRetrieval(small_config(embedding_size=8, itc_loss_weight=0.5)),
                      {**pairs, "group_size": 4}),
        "retrieval_no_itc": (InterBertForImageTextRetrieval(small_config()), {**pairs, "group_size": 2}),
        "multiple_choice": (InterBertForMultipleChoice(small_config()), {**choices, "labels": torch.tensor([1, 0])}),
        "sequence_classification": (InterBertForSequenceClassification(small_config(num_labels=3)),
                                    dict(input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"],
                                         labels=torch.tensor([0, 2, 1, 1]))),
    }


@pytest.mark.parametrize("task", ["retrieval", "retrieval_no_itc", "multiple_choice", "sequence_classification"])
def test_every_finetuning_model_captures_as_one_graph(task):
    model, inputs = _finetuning_cases()[task]
    model.train()
    torch.manual_seed(0)
    default = model.eval()(**inputs)
    reasons = _break_reasons(model.train().set_static_shapes(True), inputs)
    assert reasons == [], f"{task}: graph breaks {[r.splitlines()[0] for r in reasons]}"
    static = model.eval()(**inputs)  # and the same numbers
    for name in ("loss", "logits"):
        _close(getattr(default, name), getattr(static, name), name, atol=2e-6)


def test_the_model_and_the_data_agree_on_the_padding_of_msm_positions():
    """objectives.py keeps its own copy of the padding value (a model folder's code carries no data module)."""
    from interbert import objectives
    from interbert.data import masking

    assert objectives.NO_POSITION == masking.NO_POSITION
