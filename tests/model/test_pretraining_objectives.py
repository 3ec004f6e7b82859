"""What each pretraining objective sees (issue 13): matching on clean or masked inputs, MSM on which
pairs, and the hard-negative share over the run — the data side, the training loop's step, the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from interbert.data import Caption, Regions
from interbert.data.batches import PretrainingDataset, collate
from interbert.data.negatives import hard_ratio_at
from interbert.modeling import InterBertForPreTraining, InterBertModel, contrastive_loss, fuse
from interbert.train import TrainConfig, train
from test_modeling import C, V, batch, small_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MASK_ID = 3


def masked_batch(b=6, t=8, r=5, seed=0) -> tuple[dict, dict]:
    """``(clean, masked)``: a batch as written and detected, and the same batch with some tokens replaced
    by [MASK] and some regions zeroed, with the labels that restore it (itm_labels 1, 0, 1, 0, ...)."""
    g = torch.Generator().manual_seed(seed)
    clean = batch(b, t, r, seed)
    text_masked = torch.rand(b, t, generator=g) < 0.4
    text_masked[:, 0] = False
    region_masked = torch.rand(b, r, generator=g) < 0.4
    region_masked[:, 0] = False
    labels = dict(
        msm_labels=torch.where(text_masked, clean["input_ids"], -100),
        mrm_mask=region_masked,
        mrm_class_targets=torch.softmax(torch.randn(b, r, C, generator=g), -1),
        mrm_feature_targets=clean["region_features"],
        itm_labels=torch.tensor([1, 0] * (b // 2)),
    )
    masked = {**clean, "input_ids": clean["input_ids"].masked_fill(text_masked, MASK_ID),
              "region_features": clean["region_features"].masked_fill(region_masked[..., None], 0.0), **labels}
    return clean, masked


def sharp(model: InterBertForPreTraining) -> InterBertForPreTraining:
    """Eval mode, with the ITM classifier scaled up so that its logits are O(1-10), not O(1e-3) as at
    initialisation: a 1e-5 tolerance then tells inputs apart."""
    with torch.no_grad():
        model.itm_classifier.weight.normal_(0.0, 30.0)
    return model.eval()


def itm_logits_of(model: InterBertForPreTraining, inputs: dict) -> torch.Tensor:
    """The ITM head on a separate, plain InterBertModel forward of ``inputs``."""
    out = InterBertModel.forward(model.interbert, **inputs)
    return model.itm_classifier(fuse(out.text_pooled, out.image_pooled, model.config.fusion))


@pytest.mark.parametrize("mrm_target", ["classes", "features"])
def test_clean_matching_sees_exactly_the_unmasked_caption_and_regions(mrm_target):
    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config(itm_inputs="clean", mrm_target=mrm_target, embedding_size=8,
                                                 itc_loss_weight=1.0))
    sharp(model)
    clean, masked = masked_batch()
    out = model(**masked)
    with torch.no_grad():
        torch.testing.assert_close(out.itm_logits, itm_logits_of(model, clean), atol=1e-5, rtol=0)
        assert out.itm_logits.abs().max() > 1  # a tolerance of 1e-5 means something
        assert not torch.allclose(out.itm_logits, itm_logits_of(model, {k: masked[k] for k in clean}), atol=1e-2)
        # ITC: the matched pairs' clean single-modal embeddings
        rows = masked["itm_labels"].bool()
        text = model.interbert.embed_text(clean["input_ids"][rows], clean["attention_mask"][rows])
        image = model.interbert.embed_images(clean["region_features"][rows], clean["region_boxes"][rows])
        torch.testing.assert_close(out.itc_loss, contrastive_loss(text, image, model.config.itc_temperature),
                                   atol=1e-5, rtol=0)
    # the masked heads still read the masked pass: MSM's loss is the one the masked mode computes
    masked_mode = InterBertForPreTraining(small_config(mrm_target=mrm_target, embedding_size=8, itc_loss_weight=1.0)).eval()
    masked_mode.load_state_dict(model.state_dict())
    reference = masked_mode(**masked)
    torch.testing.assert_close(out.msm_loss, reference.msm_loss)
    torch.testing.assert_close(out.mrm_loss, reference.mrm_loss)


def test_masked_matching_reads_the_masked_inputs_as_the_original():
    torch.manual_seed(0)
    model = sharp(InterBertForPreTraining(small_config()))
    clean, masked = masked_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**masked).itm_logits, itm_logits_of(model, {k: masked[k] for k in clean}),
                                   atol=1e-5, rtol=0)


def test_clean_matching_takes_in_batch_negatives_from_the_clean_pairs():
    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config(itm_inputs="clean", itm_negatives="in_batch", embedding_size=8,
                                                 itc_loss_weight=1.0))
    sharp(model)
    clean, masked = masked_batch()
    masked["itm_labels"] = torch.ones(6, dtype=torch.long)
    torch.manual_seed(1)
    out = model(**masked)
    # replay the draw: the clean embeddings' similarity picks the same images
    torch.manual_seed(1)
    order, _, _ = model.mine_in_batch_negatives(*model.clean_inputs(
        {k: masked[k] for k in ("input_ids", "attention_mask")} | {"token_type_ids": None},
        {k: masked[k] for k in ("region_features", "region_boxes", "region_mask")},
        masked["msm_labels"], masked["mrm_mask"], masked["mrm_feature_targets"]), masked["itm_labels"], None)
    assert (out.itm_labels == (order == torch.arange(6)).long()).all() and not out.itm_labels.all()
    paired = {**{k: clean[k] for k in ("input_ids", "attention_mask")},
              **{k: clean[k][order] for k in ("region_features", "region_boxes", "region_mask")}}
    with torch.no_grad():
        torch.testing.assert_close(out.itm_logits, itm_logits_of(model, paired), atol=1e-5, rtol=0)


@pytest.mark.parametrize("msm_pairs, moves", [("matched", False), ("all", True)])
def test_msm_on_matched_pairs_ignores_the_mismatched_ones(msm_pairs, moves):
    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config(msm_pairs=msm_pairs)).eval()
    _, masked = masked_batch()
    out = model(**masked)
    assert out.msm_loss > 0
    changed = {**masked, "msm_labels": masked["msm_labels"].clone()}
    row = 1  # a mismatched pair
    assert masked["itm_labels"][row] == 0 and (masked["msm_labels"][row] != -100).any()
    at = changed["msm_labels"][row] != -100
    changed["msm_labels"][row, at] = (changed["msm_labels"][row, at] + 7) % V
    assert torch.allclose(model(**changed).msm_loss, out.msm_loss) != moves
    # a matched pair's labels count either way
    changed["msm_labels"][0] = torch.where(masked["msm_labels"][0] != -100, (masked["msm_labels"][0] + 7) % V, -100)
    assert not torch.allclose(model(**changed).msm_loss, out.msm_loss)
    # full logits (every position) take the same loss
    torch.testing.assert_close(model(**masked, full_logits=True).msm_loss, out.msm_loss)


def test_config_refuses_unknown_matching_inputs_and_msm_pairs():
    with pytest.raises(ValueError, match="itm_inputs"):
        small_config(itm_inputs="unmasked")
    with pytest.raises(ValueError, match="msm_pairs"):
        small_config(msm_pairs="some")


# -- the hard-negative schedule --------------------------------------------------------------------
def test_hard_ratio_follows_its_formula():
    assert [hard_ratio_at(step, 101, 0.5) for step in (0, 50, 100)] == [0.5, 0.5, 0.5]  # fixed share
    for step in (0, 1, 25, 50, 99, 100, 150):
        assert hard_ratio_at(step, 101, end=1.0, start=0.0) == pytest.approx(min(1.0, step / 100))
    assert hard_ratio_at(0, 11, end=0.2, start=0.8) == pytest.approx(0.8)
    assert hard_ratio_at(5, 11, end=0.2, start=0.8) == pytest.approx(0.5)
    assert hard_ratio_at(10, 11, end=0.2, start=0.8) == pytest.approx(0.2)
    assert hard_ratio_at(0, 1, end=1.0, start=0.0) == 0.0  # a one-step run: the start share


class _Store:
    """Three regions per image, distinct features per image, class distributions."""

    path, feature_dim = "memory", 4

    def __init__(self, ids):
        self.ids_ = set(ids)

    def __contains__(self, image_id):
        return image_id in self.ids_

    def __getitem__(self, image_id):
        rng = np.random.default_rng(int(image_id))
        boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]], np.float32)
        return Regions(rng.standard_normal((3, 4)), boxes, 64, 64, rng.dirichlet(np.ones(5), size=3))


class _Tokenizer:
    mask_token_id, pad_token_id = 3, 0

    def __len__(self):
        return 20


@pytest.fixture()
def dataset(monkeypatch):
    from interbert.data import batches
    from interbert.data.tokenize import EncodedText

    monkeypatch.setattr(batches, "encode_captions", lambda tok, texts, n, seg: [
        EncodedText([2, 5 + int(t), 6, 1], [None, 0, 1, None]) for t in texts])
    captions = [Caption(str(n % 20), f"{n}", str(n % 10)) for n in range(200)]
    # the "hard" negative of every caption is caption 0 or 1 (other images' captions 0/1 never are)
    hard = np.array([[0] if c.image_id != "0" else [1] for c in captions])
    return PretrainingDataset(captions, _Store({c.image_id for c in captions}), _Tokenizer(), hard_negatives=hard,
                              hard_ratio=1.0, hard_ratio_start=0.0, clean_features=True, region_cache=False)


def _hard_share(dataset) -> float:
    negatives = [e for e in (dataset[i] for i in range(len(dataset))) if e["itm_labels"] == 0]
    return np.mean([e["caption_id"] in ("0", "1") for e in negatives])


def test_pretraining_data_follows_the_schedule_from_the_step_it_is_told(dataset):
    dataset.set_progress(0, 100)
    assert _hard_share(dataset) < 0.05  # random captions only (a random one may be caption 0/1)
    dataset.set_progress(99, 100)
    assert _hard_share(dataset) == 1.0
    dataset.set_progress(50, 101)
    assert 0.3 < _hard_share(dataset) < 0.7
    dataset.step = None  # no progress told (a held-out set): the end share
    assert _hard_share(dataset) == 1.0


def test_clean_features_ride_along_with_class_targets(dataset):
    example = dataset[4]
    original = _Store(["0"])[dataset.captions[4].image_id].features
    assert "mrm_class_targets" in example
    np.testing.assert_allclose(example["mrm_feature_targets"][1:], original, rtol=1e-6)  # position 0: the global region
    assert set(collate([dataset[0], dataset[1]])) >= {"mrm_feature_targets", "mrm_class_targets"}


@dataclass
class _Out:
    loss: torch.Tensor


class _StepRecorder(torch.utils.data.Dataset):
    """Records, per item built, the step the training loop said it is for."""

    def __init__(self):
        self.step, self.seen = None, []

    def set_progress(self, step, total_steps):
        self.step, self.total = step, total_steps

    def __len__(self):
        return 12

    def __getitem__(self, index):
        self.seen.append((self.step, self.total))
        return {"x": torch.ones(1)}


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return _Out(F.mse_loss(x * self.w, x))


def test_the_training_loop_tells_the_data_its_optimisation_step(tmp_path):
    data = _StepRecorder()
    # 12 examples, batches of 2, 2 micro-batches per update: 3 updates per epoch, 5 updates cross an epoch
    config = TrainConfig(output_dir=str(tmp_path), batch_size=2, grad_accum_steps=2, max_steps=5,
                         progress_bar=False, tensorboard=False)
    train(_Linear(), data, config)
    steps = [step for step, _ in data.seen[::2]]  # one entry per example, two examples per batch
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and {total for _, total in data.seen} == {5}


def test_the_ablation_table_reports_when_itm_leaves_chance():
    from interbert.recipes.demo import first_step_below

    itm = [0.69] * 150 + [0.5] * 150
    # the 100-step mean first drops below 0.6 once 10% of 0.69 ... : at step 150 + k with 0.69*(100-k)+0.5k < 60
    assert first_step_below(itm, 0.6) == 150 + 48
    # a step without a value (e.g. ITM at the masked steps of task_sampling=alternate) is skipped, and the
    # step reported is the pretraining step, not the count of values
    assert first_step_below([None, *itm], 0.6) == 1 + 150 + 48
    assert first_step_below([x for v in itm for x in (None, v)], 0.6) == 2 * (150 + 48)
    assert first_step_below([0.69] * 300, 0.6) is None and first_step_below([0.1] * 50, 0.6) is None


# -- the clean-matching step shares the region projection (issue 14) ----------------------------------
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, image_hidden_dropout_prob=0.0,
                  image_attention_probs_dropout_prob=0.0, itm_dropout_prob=0.0)


def padded_masked_batch() -> dict:
    """masked_batch with padded regions (zero features, never masked, as the data pipeline pads them)."""
    _, masked = masked_batch()
    masked["region_mask"] = masked["region_mask"].clone()
    masked["region_mask"][::2, -2:] = 0
    padded = ~masked["region_mask"].bool()
    masked["mrm_mask"] = masked["mrm_mask"] & ~padded
    masked["region_features"] = masked["region_features"].masked_fill(padded[..., None], 0.0)
    assert masked["mrm_mask"].sum() >= 3 and padded.any()
    return masked


def reference_step(model: InterBertForPreTraining, masked: dict) -> torch.Tensor:
    """The step's loss the way it was computed before the projection was shared: every pass embeds the
    region features itself (the masked features, the restored clean ones, the matched pairs' clean ones),
    as the other side of benchmarks/shared_projection.py does."""

    def per_pass_features(image: dict, mrm_mask, mrm_feature_targets) -> tuple[dict, dict]:
        return image, model.clean_inputs({"input_ids": None}, image, None, mrm_mask, mrm_feature_targets)[1]

    model.project_regions = per_pass_features
    try:
        projected = []
        handle = model.interbert.region_embeddings.feature_projection.register_forward_hook(
            lambda module, args, output: projected.append(args[0].shape[:-1].numel()))
        loss = model(**masked).loss
        handle.remove()
    finally:
        del model.project_regions
    # every pass projected every region (padding included) itself: the masked one, the clean one (clean
    # mode) and ITC's image pass on the matched pairs
    regions = masked["region_mask"].numel()
    matched = int(masked["itm_labels"].sum()) * masked["region_mask"].shape[1]
    assert projected == ([regions, regions, matched] if model.config.itm_inputs == "clean" else [regions, matched])
    return loss


def loss_and_grads(model, run) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = run()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("itm_inputs", ["clean", "masked"])
@pytest.mark.parametrize("mrm_target", ["classes", "features"])
def test_the_step_computes_the_losses_and_gradients_of_separate_passes(itm_inputs, mrm_target):
    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config(itm_inputs=itm_inputs, mrm_target=mrm_target, embedding_size=8,
                                                 itc_loss_weight=1.0, **NO_DROPOUT)).train()
    with torch.no_grad():
        model.itm_classifier.weight.normal_(0.0, 30.0)  # ITM logits O(1-10): its gradient is not noise
    masked = padded_masked_batch()
    loss, grads = loss_and_grads(model, lambda: model(**masked).loss)
    reference, expected = loss_and_grads(model, lambda: reference_step(model, masked))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0)
    assert grads.keys() == expected.keys() and "interbert.region_embeddings.feature_projection.weight" in grads
    # relative to the largest gradient: some are 0 up to rounding (a key bias: softmax ignores a shift)
    scale = max(float(g.abs().max()) for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_the_clean_step_projects_each_region_once_and_the_restored_ones_again():
    model = InterBertForPreTraining(small_config(itm_inputs="clean", embedding_size=8, itc_loss_weight=1.0)).train()
    masked = padded_masked_batch()
    rows = []
    handle = model.interbert.region_embeddings.feature_projection.register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[0]))
    model(**masked).loss.backward()
    handle.remove()
    # the real regions as given, then the masked ones restored: not every region in each of the three passes
    assert rows == [int(masked["region_mask"].sum()), int(masked["mrm_mask"].sum())]


def test_the_clean_step_with_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from interbert.train import enable_gradient_checkpointing

    torch.manual_seed(0)
    config = small_config(itm_inputs="clean", embedding_size=8, itc_loss_weight=1.0)  # dropout 0.1: RNG restored
    plain = InterBertForPreTraining(config).train()
    checkpointed = InterBertForPreTraining(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(checkpointed)
    masked = padded_masked_batch()

    def run(model):
        torch.manual_seed(3)
        return model(**masked).loss

    loss, grads = loss_and_grads(plain, lambda: run(plain))
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, lambda: run(checkpointed))
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-5)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 20
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_a_precomputed_region_projection_embeds_as_the_features_do():
    torch.manual_seed(0)
    base = InterBertModel(small_config(embedding_size=8)).eval()
    inputs = batch(3, 7, 5)
    projection = base.region_embeddings.feature_projection(inputs["region_features"])
    with torch.no_grad():
        torch.testing.assert_close(
            base.embed_images(None, inputs["region_boxes"], inputs["region_mask"], region_projection=projection),
            base.embed_images(inputs["region_features"], inputs["region_boxes"], inputs["region_mask"]))
    with pytest.raises(ValueError, match=r"region_projection must be batch x regions x 32 \(config.hidden_size\)"):
        base.embed_images(None, inputs["region_boxes"], region_projection=inputs["region_features"])


# -- UNITER-style task sampling: masked and matching steps in turn ------------------------------------------


def test_alternating_steps_give_masked_own_pairs_then_unmasked_itm_pairs(dataset):
    alternate = PretrainingDataset(dataset.captions, _Store({c.image_id for c in dataset.captions}), _Tokenizer(),
                                   hard_negatives=dataset.hard_negatives, hard_ratio=1.0, clean_features=True,
                                   region_cache=False, task_sampling="alternate")
    alternate.set_progress(4, 10)  # even: a masked step
    masked = [alternate[i] for i in range(len(alternate))]
    assert all("itm_labels" not in e and "msm_labels" in e and "mrm_mask" in e for e in masked)
    assert [e["caption_id"] for e in masked] == [c.caption_id for c in alternate.captions]  # each with its own image
    assert all("mrm_feature_targets" not in e for e in masked)  # no clean pass to restore them for
    assert sum(int((e["msm_labels"] != -100).sum()) for e in masked) > 0
    alternate.set_progress(5, 10)  # odd: a matching step
    matching = [alternate[i] for i in range(len(alternate))]
    assert all(set(e) == {"input_ids", "region_features", "region_boxes", "itm_labels", "image_id", "caption_id"}
               for e in matching)
    # the caption as written (the stand-in encoding of caption text t is [2, 5 + t, 6, 1]), the regions as detected
    for i, e in enumerate(matching):
        if e["itm_labels"] == 1:
            assert e["input_ids"].tolist() == [2, 5 + int(alternate.captions[i].text), 6, 1]
        assert MASK_ID not in e["input_ids"].tolist()
    original = _Store(["0"])[alternate.captions[4].image_id].features
    np.testing.assert_allclose(matching[4]["region_features"][1:], original, rtol=1e-6)
    labels = np.array([e["itm_labels"] for e in matching])
    assert 0.3 < labels.mean() < 0.7  # kept pairs and negatives, as the joint step draws them
    assert set(collate(matching[:4])) >= {"itm_labels", "image_index"} and "msm_labels" not in collate(matching[:4])
    alternate.step = None  # a held-out set: every objective at once
    assert {"itm_labels", "msm_labels", "mrm_mask"} <= set(alternate[0])
    with pytest.raises(ValueError, match="task_sampling"):
        PretrainingDataset(dataset.captions, _Store(["0"]), _Tokenizer(), hard_negatives=None, task_sampling="uniter")


@pytest.mark.parametrize("itm_inputs", ["clean", "masked"])
def test_a_matching_step_scores_the_pairs_in_one_plain_pass_and_a_masked_step_runs_only_the_heads(itm_inputs):
    torch.manual_seed(0)
    model = sharp(InterBertForPreTraining(small_config(itm_inputs=itm_inputs, embedding_size=8, itc_loss_weight=1.0)))
    clean, masked = masked_batch()
    matching = model(**clean, itm_labels=masked["itm_labels"])
    with torch.no_grad():
        torch.testing.assert_close(matching.itm_logits, itm_logits_of(model, clean), atol=1e-5, rtol=0)
        rows = masked["itm_labels"].bool()
        text = model.interbert.embed_text(clean["input_ids"][rows], clean["attention_mask"][rows])
        image = model.interbert.embed_images(clean["region_features"][rows], clean["region_boxes"][rows])
        torch.testing.assert_close(matching.itc_loss, contrastive_loss(text, image, model.config.itc_temperature),
                                   atol=1e-5, rtol=0)
    assert matching.msm_logits is None and matching.msm_loss is None and matching.mrm_loss is None
    torch.testing.assert_close(matching.loss, matching.itm_loss + matching.itc_loss)

    without_itm = {k: v for k, v in masked.items() if k != "itm_labels"}
    step = model(**without_itm)
    assert step.itm_loss is None and step.itc_loss is None
    # clean mode: no second pass and no ITM logits (ITM never reads a masked pass); masked mode: the original's
    assert (step.itm_logits is None) == (itm_inputs == "clean")
    torch.testing.assert_close(step.loss, step.msm_loss + step.mrm_loss)
    # every masked region is scored (the pairs of a masked step are all matched), with the joint step's heads
    joint = model(**{**masked, "itm_labels": torch.ones(6, dtype=torch.long)})
    torch.testing.assert_close(step.msm_loss, joint.msm_loss)
    torch.testing.assert_close(step.mrm_loss, joint.mrm_loss)


def test_pretraining_with_alternating_tasks_logs_each_objective_every_other_step(tmp_path):
    from interbert.recipes import pretrain
    from interbert.synthetic import generate

    data = generate(tmp_path / "data", val_images=4, test_images=4, images=48, feature_dim=32, seed=0, fmt="store", render_images=False)
    files = data["files"]
    result = pretrain.run({
        "model": {"preset": "tiny", "overrides": {"itm_inputs": "clean", "itc_loss_weight": 1.0, "embedding_size": 16}},
        "data": {"captions": str(tmp_path / "data" / files["captions"]), "features": str(tmp_path / "data" / files["regions"]),
                 "vocab_size": 120, "max_tokens": 16, "max_regions": 12, "hard_ratio": 0.5, "task_sampling": "alternate"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 8, "log_every": 1,
                  "progress_bar": False, "tensorboard": False, "learning_rate": 1e-4},
    })
    history = result["history"]
    assert [v is None for v in history["itm_loss"]] == [True, False] * 3
    assert [v is None for v in history["itc_loss"]] == [True, False] * 3
    assert [v is None for v in history["msm_loss"]] == [False, True] * 3
    assert [v is None for v in history["mrm_loss"]] == [False, True] * 3
    assert all(v is not None for v in history["loss"])
