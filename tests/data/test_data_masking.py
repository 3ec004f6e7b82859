"""MSM span statistics and MRM IoU grouping on small hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from interbert.data.masking import (
    apply_region_masking,
    apply_token_masking,
    geometric_span_mask,
    mask_region_groups,
    mask_regions_independently,
    region_iou,
    single_span_mask,
    token_mask,
)


def maskable_of(length: int, pad: int = 0) -> np.ndarray:
    """[CLS] w1..w_length [SEP] + padding."""
    return np.array([False] + [True] * length + [False] + [False] * pad)


def test_single_span_is_contiguous_and_matches_the_originals_distribution():
    n, draws = 8, 20000
    rng = np.random.default_rng(0)
    maskable = maskable_of(n, pad=3)
    starts, lengths = np.zeros(n), []
    for _ in range(draws):
        m = single_span_mask(maskable, rng)
        idx = np.flatnonzero(m)
        assert len(idx) >= 1 and (np.diff(idx) == 1).all() and maskable[idx].all()  # one span, inside the caption
        starts[idx[0] - 1] += 1
        lengths.append(len(idx))
    # start uniform over the n tokens; length uniform in [1, n] then cut at the caption's end
    np.testing.assert_allclose(starts / draws, 1 / n, atol=0.01)
    expected_mean = np.mean([min(l, n - s) for s in range(n) for l in range(1, n + 1)])
    assert abs(np.mean(lengths) - expected_mean) < 0.05
    assert np.mean(np.array(lengths) == n) == pytest.approx(1 / n**2, abs=0.005)


def test_whole_word_spans_never_cut_a_word():
    word_ids = [None, 0, 0, 1, 2, 2, 2, 3, None]
    maskable = np.array([w is not None for w in word_ids])
    rng = np.random.default_rng(1)
    words = np.array([-1 if w is None else w for w in word_ids])
    for fn in (single_span_mask, geometric_span_mask, token_mask):
        for _ in range(200):
            m = fn(maskable, rng, word_ids=word_ids)
            assert m.any()
            for w in range(4):  # all of a word's pieces or none
                assert m[words == w].all() or not m[words == w].any()


def test_geometric_spans_mask_about_15_percent_in_spans():
    rng = np.random.default_rng(2)
    maskable = maskable_of(200)
    fractions, runs = [], []
    for _ in range(300):
        m = geometric_span_mask(maskable, rng)
        fractions.append(m.sum() / 200)
        edges = np.diff(np.concatenate([[0], m.astype(int), [0]]))
        runs += list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    assert np.mean(fractions) == pytest.approx(0.15, abs=0.01)
    assert 2.5 < np.mean(runs) < 6  # spans of mean ~3.8 (SpanBERT), sometimes merged with a neighbour


def test_token_mask_takes_15_percent():
    m = token_mask(maskable_of(40), np.random.default_rng(3))
    assert m.sum() == 6 and not m[0] and not m[41]


def test_80_10_10_replacement_and_labels():
    rng = np.random.default_rng(4)
    ids = np.arange(1000, 1000 + 50_000) % 30000 + 1000
    mask = np.zeros(len(ids), bool)
    mask[::2] = True
    masked, labels = apply_token_masking(ids, mask, rng, mask_token_id=103, vocab_size=30522)
    assert (labels[~mask] == -100).all() and (labels[mask] == ids[mask]).all()
    assert (masked[~mask] == ids[~mask]).all()
    at = masked[mask]
    frac_mask, frac_kept = np.mean(at == 103), np.mean(at == ids[mask])
    assert frac_mask == pytest.approx(0.8, abs=0.01)
    assert frac_kept == pytest.approx(0.1, abs=0.01)  # (a random draw equal to the original is rare)
    assert 1 - frac_mask - frac_kept == pytest.approx(0.1, abs=0.01)


class FixedDraws:
    """A stand-in generator whose ``random(n)`` returns chosen values: picks the anchors by hand."""

    def __init__(self, values):
        self.values = np.asarray(values, float)

    def random(self, n):
        assert n == len(self.values)
        return self.values


BOXES = np.array([
    [0, 0, 10, 10],    # 0 global position (never masked, even when it overlaps)
    [0, 0, 10, 10],    # 1
    [0, 0, 10, 12],    # 2: IoU(1) = 100/120
    [0, 0, 10, 25],    # 3: IoU(1) = 100/250 = 0.4 exactly (>= masks), IoU(2) = 0.48
    [50, 50, 60, 60],  # 4: alone
    [0, 0, 20, 20],    # 5: IoU(1) = 0.25, IoU(2) = 0.3, IoU(3) = 200/450
    [0, 0, 10, 10],    # 6: padding
], dtype=np.float32)
REAL = np.array([1, 1, 1, 1, 1, 1, 0], bool)


def test_region_iou_hand_computed():
    iou = region_iou(BOXES)
    assert iou[1, 2] == pytest.approx(100 / 120) and iou[1, 3] == pytest.approx(0.4)
    assert iou[3, 5] == pytest.approx(200 / 450) and iou[1, 4] == 0 and np.allclose(iou, iou.T)
    assert np.allclose(np.diag(iou), 1)


@pytest.mark.parametrize("anchors, expected", [
    ([1], [1, 2, 3]),
    ([5], [3, 5]),
    ([4], [4]),
    ([0], []),            # the global region can't be an anchor
    ([6], []),            # nor padding
    ([2, 4], [1, 2, 3, 4]),
])
def test_mask_region_groups_masks_the_known_set(anchors, expected):
    draws = np.ones(len(BOXES))
    draws[anchors] = 0.05  # < p_anchor = 0.1
    mask = mask_region_groups(BOXES, REAL, FixedDraws(draws))
    assert sorted(np.flatnonzero(mask)) == expected


def test_anchor_rate_and_independent_ablation():
    rng = np.random.default_rng(5)
    boxes = np.array([[i * 10, 0, i * 10 + 5, 5] for i in range(101)], np.float32)  # disjoint: groups of one
    real = np.ones(101, bool)
    rate = np.mean([mask_region_groups(boxes, real, rng)[1:].mean() for _ in range(2000)])
    assert rate == pytest.approx(0.1, abs=0.005)
    rate = np.mean([mask_regions_independently(real, rng)[1:].mean() for _ in range(2000)])
    assert rate == pytest.approx(0.15, abs=0.005)
    assert not any(mask_regions_independently(real, rng)[0] for _ in range(100))


def test_region_masking_zeroes_features_and_keeps_targets():
    features = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    mask = np.array([False, True, False, True])
    masked, targets = apply_region_masking(features, mask)  # no class probabilities: regression
    assert (masked[mask] == 0).all() and (masked[~mask] == features[~mask]).all()
    assert set(targets) == {"mrm_mask", "mrm_feature_targets"}
    np.testing.assert_array_equal(targets["mrm_feature_targets"], features)
    probs = np.full((4, 5), 0.2, np.float32)
    _, targets = apply_region_masking(features, mask, probs)  # with the detector's distribution: KL
    assert set(targets) == {"mrm_mask", "mrm_class_targets"}
    np.testing.assert_array_equal(targets["mrm_class_targets"], probs)
