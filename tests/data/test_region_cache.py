"""The in-memory region cache and the caption encoding cache change speed, not data: for the same seed
a dataset with them builds exactly the examples (masking, negatives, groups) that one without builds."""

from __future__ import annotations

import numpy as np
import pytest

from interbert.data import Caption, Regions
from interbert.data.batches import PretrainingDataset, RegionCache, RetrievalDataset, collate
from interbert.data.features import open_features, write_tsv
from interbert.data.masking import mask_region_groups, region_iou
from interbert.data.tokenize import train_wordpiece

WORDS = "a red blue green cube ball cone left of right above below near small large two".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    items = []
    for i in range(12):
        n = int(rng.integers(5, 14))  # some images above max_regions below: the cache must cut them alike
        xy = rng.uniform(0, 60, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, size=(n, 2))], 1)
        probs = rng.dirichlet(np.ones(7), size=n)
        items.append((f"img{i}", Regions(rng.normal(size=(n, 16)), boxes, 100, 100, probs)))
    write_tsv(root / "regions.tsv", items, with_class_probs=True)
    captions = [Caption(f"img{i}", f"img{i}#{k}", " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))), "train")
                for i in range(12) for k in range(3)]
    tokenizer = train_wordpiece([c.text for c in captions], root / "tok", vocab_size=60, min_frequency=1)
    return open_features(root / "regions.tsv"), captions, tokenizer


def _equal(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or hasattr(a, "numpy"):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


@pytest.mark.parametrize("mrm", ["group", "region"])
def test_cached_pretraining_examples_equal_uncached(data, mrm):
    store, captions, tokenizer = data
    kwargs = dict(max_regions=10, mrm=mrm, num_hard=3, seed=5)
    cached = PretrainingDataset(captions, store, tokenizer, region_cache=True, **kwargs)
    plain = PretrainingDataset(captions, store, tokenizer, region_cache=False, **kwargs)
    assert cached.region_cache is not None and plain.region_cache is None
    assert ("overlaps" in cached.region_cache["img0"]) == (mrm == "group")
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        examples = [(cached[i], plain[i]) for i in range(len(cached))]
        assert all(_equal(a, b) for a, b in examples)
        assert any(a["mrm_mask"].any() for a, _ in examples)  # the masking was exercised
        assert _equal(collate([a for a, _ in examples]), collate([b for _, b in examples]))
    # examples are copies: masking one never writes into the cache
    assert not np.any(cached.region_cache["img0"]["region_features"] == 0)


def test_cached_retrieval_groups_equal_uncached(data):
    store, captions, tokenizer = data
    cached = RetrievalDataset(captions, store, tokenizer, max_regions=10, num_hard=3, seed=2, region_cache=True)
    plain = RetrievalDataset(captions, store, tokenizer, max_regions=10, num_hard=3, seed=2, region_cache=False)
    assert all(_equal(cached[i], plain[i]) for i in range(len(cached)))
    assert _equal(collate([cached[0], cached[7]]), collate([plain[0], plain[7]]))


def test_cached_arrays_are_read_only(data):
    store, captions, tokenizer = data
    cache = RegionCache(store, ["img1"], max_regions=10, iou_threshold=0.4)
    with pytest.raises(ValueError):
        cache["img1"]["region_features"][0, 0] = 1.0
    assert cache.nbytes > 0


def test_group_masking_with_given_overlaps_draws_the_same_mask():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 0.6, size=(30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, size=(30, 2))], 1)
    real = np.ones(30, bool)
    for seed in range(50):
        plain = mask_region_groups(boxes, real, np.random.default_rng(seed))
        given = mask_region_groups(boxes, real, np.random.default_rng(seed), overlaps=region_iou(boxes) >= 0.4)
        assert np.array_equal(plain, given)


def test_auto_cache_follows_the_memory_estimate(data, monkeypatch):
    import interbert.data.batches as batches

    store, _, _ = data
    ids = [f"img{i}" for i in range(12)]
    need = RegionCache.estimated_bytes(store, ids, 10)
    assert need >= 12 * 10 * 4 * (16 + 5 + 7)
    monkeypatch.setattr(batches, "_available_memory", lambda: 4 * need)
    assert RegionCache.decide("auto", store, ids, 10)
    monkeypatch.setattr(batches, "_available_memory", lambda: 2 * need)
    assert not RegionCache.decide("auto", store, ids, 10)
    assert not RegionCache.decide(False, store, ids, 10) and RegionCache.decide(True, store, ids, 10)
    with pytest.raises(ValueError):
        RegionCache.decide("yes", store, ids, 10)


def test_captions_encoded_together_equal_one_by_one(data):
    from interbert.data.tokenize import encode_caption, encode_captions

    _, captions, tokenizer = data
    texts = [c.text for c in captions] + ["", "a " * 60]  # empty, and cut at max_tokens
    together = encode_captions(tokenizer, texts, max_tokens=12)
    alone = [encode_caption(tokenizer, t, 12) for t in texts]
    assert [(e.input_ids, e.word_ids) for e in together] == [(e.input_ids, e.word_ids) for e in alone]
    assert max(len(e.input_ids) for e in together) == 12
