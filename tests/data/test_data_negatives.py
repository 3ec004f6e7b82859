"""Hard negatives: never the same image, equal to the TF-IDF nearest, cached; ITM and in-batch sampling."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from conftest import shared_path
from sklearn.feature_extraction.text import TfidfVectorizer

from interbert.data.captions import read_captions
from interbert.data.negatives import (
    image_hard_negatives,
    in_batch_itm_pairs,
    sample_in_batch_negatives,
    sample_itm_caption,
    tfidf_hard_negatives,
)
from interbert.utils import files
from interbert.utils.files import leftover_temporaries


@pytest.fixture(scope="module")
def flickr8k_test():
    captions = read_captions(shared_path("data", "flickr8k", "DERIVED_dataset_flickr8k_test_karpathy_format.json"))
    return [c.text for c in captions[:1500]], [c.image_id for c in captions[:1500]]


def test_tfidf_hard_negatives_are_the_nearest_captions_of_other_images(flickr8k_test, tmp_path):
    texts, image_ids = flickr8k_test
    k = 5
    hard = tfidf_hard_negatives(texts, image_ids, k=k, chunk_size=400, cache_dir=tmp_path)  # several chunks
    assert hard.shape == (len(texts), k)
    ids = np.array(image_ids)
    assert (ids[hard] != ids[:, None]).all()  # never the same image
    # brute force: dense cosine over all pairs, other images only
    x = TfidfVectorizer().fit_transform(texts).toarray()
    sim = x @ x.T
    sim[ids[:, None] == ids[None, :]] = -np.inf
    best = -np.sort(-sim, axis=1)[:, :k]
    np.testing.assert_allclose(np.take_along_axis(sim, hard, 1), best, rtol=1e-5, atol=1e-6)
    # cached on disk, keyed by content: same input -> the file is reused; other input -> another file
    cached = list(tmp_path.glob("tfidf_hn_*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.zeros_like(hard))  # a reused cache returns exactly the stored array
    assert (tfidf_hard_negatives(texts, image_ids, k=k, cache_dir=tmp_path) == 0).all()
    tfidf_hard_negatives(texts[:-1], image_ids[:-1], k=k, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tfidf_hn_*.npy"))) == 2


def test_a_failed_cache_write_leaves_no_cache_and_no_temporary(tmp_path, monkeypatch):
    texts = ["a red car", "a red car parked", "a blue bird", "a bird flying", "red car on a road"]
    image_ids = ["car", "car", "bird", "bird", "road"]

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(files.os, "replace", full_disk)
        with pytest.raises(OSError, match="No space left"):
            tfidf_hard_negatives(texts, image_ids, k=2, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == [] and leftover_temporaries(tmp_path) == []
    expected = tfidf_hard_negatives(texts, image_ids, k=2)
    np.testing.assert_array_equal(tfidf_hard_negatives(texts, image_ids, k=2, cache_dir=tmp_path), expected)
    (cached,) = tmp_path.iterdir()  # the cache under its own name (no ".npy" added to a temporary's name)
    np.testing.assert_array_equal(np.load(cached), expected)


def test_tfidf_hand_made():
    texts = ["a red car", "a red car parked", "a blue bird", "a bird flying", "red car on a road"]
    ids = ["i1", "i1", "i2", "i2", "i3"]
    hard = tfidf_hard_negatives(texts, ids, k=1)
    assert hard[:, 0].tolist()[:2] == [4, 4] and hard[4, 0] in (0, 1) and hard[2, 0] in (0, 1, 4)


def test_itm_sampling_rates():
    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(100), 5)
    hard = np.stack([(np.arange(3) + 5 * (i // 5 + 1)) % 500 for i in range(500)])  # next image's captions
    draws = [sample_itm_caption(7, rng, codes, hard, hard_ratio=0.5) for _ in range(20000)]
    labels = np.array([label for _, label in draws])
    chosen = np.array([j for j, _ in draws])
    assert labels.mean() == pytest.approx(0.5, abs=0.015)
    assert (chosen[labels == 1] == 7).all() and (codes[chosen[labels == 0]] != codes[7]).all()
    from_hard = np.isin(chosen[labels == 0], hard[7])
    assert from_hard.mean() == pytest.approx(0.5 + 0.5 * 3 / 495, abs=0.02)  # random ones rarely hit the pool
    only_random = [sample_itm_caption(7, rng, codes, None, p_positive=0.0)[0] for _ in range(2000)]
    assert (codes[only_random] != codes[7]).all()


def test_image_hard_negatives_by_mean_feature():
    means = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]], np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    near = image_hard_negatives(means, k=2)
    assert near[0].tolist() == [1, 4] and near[2].tolist() == [3, 4]
    assert all(i not in row for i, row in enumerate(near))


def test_in_batch_negatives_follow_softmax_and_skip_positives():
    sim = torch.tensor([[5.0, 4.0, 0.0], [1.0, 5.0, 1.0], [0.0, 3.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_in_batch_negatives(sim, generator=g) for _ in range(600)])
    assert (draws != torch.arange(3)).all()
    p01 = torch.softmax(torch.tensor([4.0, 0.0]), 0)[0].item()
    assert (draws[:, 0] == 1).float().mean().item() == pytest.approx(p01, abs=0.02)  # 0.982
    assert (draws[:, 1] == 0).float().mean().item() == pytest.approx(0.5, abs=0.07)  # 3 sigma
    same = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # 0 and 1 show the same image
    assert (sample_in_batch_negatives(sim, same, generator=g)[:2] == 2).all()


def test_in_batch_itm_pairs_swap_a_share_of_captions_to_other_pictures():
    sim = torch.tensor([[5.0, 5.0, 4.0, 0.0], [5.0, 5.0, 0.0, 4.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # captions 0 and 1 describe the same picture
    g = torch.Generator().manual_seed(0)
    draws = [in_batch_itm_pairs(sim, same, 0.5, generator=g) for _ in range(800)]
    orders, labels = torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])
    own = orders == torch.arange(4)
    assert torch.equal(labels.bool(), own)  # label 1 exactly when a caption keeps its own image
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.04)
    assert not ((orders[:, 0] == 1) | (orders[:, 1] == 0)).any()  # never the same picture
    assert (orders[:, 0][~own[:, 0]] == 2).float().mean().item() > 0.95  # the most similar other image

    # every caption swapped at ratio 1, except one whose other images all show its picture
    order, label = in_batch_itm_pairs(sim[:2, :2], same[:2, :2], 1.0, generator=g)
    assert order.tolist() == [0, 1] and label.tolist() == [1, 1]
    order, label = in_batch_itm_pairs(sim, same, 1.0, generator=g)
    assert label.tolist() == [0, 0, 0, 0] and (order != torch.arange(4)).all()
