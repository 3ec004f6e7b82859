"""Retrieval ranks and recalls on hand-made score matrices."""

from __future__ import annotations

import numpy as np
import pytest

from interbert.evaluate import (
    image_retrieval_ranks,
    rank_summary,
    retrieval_metrics,
    text_retrieval_ranks,
    write_rank_histogram,
)

# 20 images with 2 captions each, like the 5-captions-per-image protocol at a smaller scale.
NUM_IMAGES = 20
CAPTION_IMAGE = np.repeat(np.arange(NUM_IMAGES), 2)


def test_hand_computed_three_by_three():
    scores = np.array(
        [
            [0.9, 0.1, 0.5],  # caption 0 -> image 0: best, rank 1
            [0.8, 0.3, 0.2],  # caption 1 -> image 1: image 0 is higher, rank 2
            [0.1, 0.7, 0.6],  # caption 2 -> image 2: image 1 is higher, rank 2
        ]
    )
    index = np.array([0, 1, 2])
    assert image_retrieval_ranks(scores, index).tolist() == [1, 2, 2]
    # image 0: caption 0 best; image 1: caption 2 (0.7) beats caption 1 (0.3); image 2: caption 2 best
    text_ranks, images = text_retrieval_ranks(scores, index)
    assert text_ranks.tolist() == [1, 2, 1] and images.tolist() == [0, 1, 2]

    metrics = retrieval_metrics(scores, index, ks=(1, 2))
    assert metrics["image_retrieval"] == pytest.approx(
        {"R@1": 100 / 3, "R@2": 100.0, "median_rank": 2.0, "mean_rank": 5 / 3, "num_queries": 3}
    )
    assert metrics["text_retrieval"]["R@1"] == pytest.approx(200 / 3)
    assert metrics["rsum"] == pytest.approx(100 / 3 + 100 + 200 / 3 + 100)
    assert metrics["mean_recall"] == pytest.approx(metrics["rsum"] / 4)
    assert (metrics["num_captions"], metrics["num_images"]) == (3, 3)


def test_perfect_scorer_gets_rank_one_everywhere():
    scores = np.eye(NUM_IMAGES)[CAPTION_IMAGE]
    metrics = retrieval_metrics(scores, CAPTION_IMAGE)
    for task in ("image_retrieval", "text_retrieval"):
        assert metrics[task]["R@1"] == 100.0
        assert metrics[task]["median_rank"] == metrics[task]["mean_rank"] == 1.0
    assert metrics["text_retrieval"]["num_queries"] == NUM_IMAGES
    assert metrics["rsum"] == 600.0


def test_reversed_scorer_gets_the_last_rank():
    scores = -np.eye(NUM_IMAGES)[CAPTION_IMAGE]  # the true pair scores lowest
    assert (image_retrieval_ranks(scores, CAPTION_IMAGE) == NUM_IMAGES).all()
    text_ranks, _ = text_retrieval_ranks(scores, CAPTION_IMAGE)
    assert (text_ranks == len(CAPTION_IMAGE) - 2 + 1).all()  # behind all 38 wrong captions
    assert retrieval_metrics(scores, CAPTION_IMAGE)["rsum"] == 0.0


def test_constant_scorer_gets_the_worst_rank_not_a_perfect_score():
    scores = np.zeros((len(CAPTION_IMAGE), NUM_IMAGES))
    metrics = retrieval_metrics(scores, CAPTION_IMAGE)
    assert metrics["image_retrieval"]["median_rank"] == NUM_IMAGES
    assert metrics["image_retrieval"]["R@1"] == metrics["image_retrieval"]["R@10"] == 0.0
    assert metrics["text_retrieval"]["mean_rank"] == len(CAPTION_IMAGE) - 1
    assert metrics["rsum"] == 0.0


def test_ties_count_against_the_model_but_not_ties_between_true_captions():
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])  # true image 0 tied with images 1 and 2
    assert image_retrieval_ranks(scores, np.array([0])).tolist() == [3]

    # image 0 has captions 0 and 1, tied with each other and with the wrong caption 2
    scores = np.array([[0.5, 0.0], [0.5, 0.0], [0.5, 0.9]])
    text_ranks, _ = text_retrieval_ranks(scores, np.array([0, 0, 1]))
    assert text_ranks.tolist() == [2, 1]


def test_text_retrieval_uses_the_best_placed_caption_and_skips_caption_less_images():
    scores = np.array(
        [
            [0.2, 0.9, 0.0],  # caption 0 (image 0) is placed badly for image 0
            [0.8, 0.1, 0.0],  # caption 1 (image 0) is the best caption for image 0
            [0.3, 0.5, 0.0],  # caption 2 (image 1)
        ]
    )
    index = np.array([0, 0, 1])
    text_ranks, images = text_retrieval_ranks(scores, index)
    assert images.tolist() == [0, 1]  # image 2 has no caption: a distractor only
    assert text_ranks.tolist() == [1, 2]  # image 1: caption 0 (0.9) beats caption 2 (0.5)
    assert retrieval_metrics(scores, index)["text_retrieval"]["num_queries"] == 2


def test_recall_at_k_is_the_share_of_queries_within_k():
    summary = rank_summary(np.array([1, 2, 5, 6, 11]), ks=(1, 5, 10))
    assert summary == {"R@1": 20.0, "R@5": 60.0, "R@10": 80.0, "median_rank": 5.0, "mean_rank": 5.0, "num_queries": 5}


@pytest.mark.parametrize(
    "scores, index, message",
    [
        (np.zeros((2, 3)), np.array([0]), "one image index per caption"),
        (np.zeros((2, 3)), np.array([0, 3]), "caption 1 points at image 3"),
        (np.array([[0.0, np.nan]]), np.array([0]), "caption 0 x image 1 is nan"),
        (np.zeros(3), np.array([0, 1, 2]), "captions x images matrix"),
        (np.zeros((1, 2)), np.array([0.0]), "must hold integers"),
    ],
)
def test_bad_input_is_a_clear_error(scores, index, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(scores, index)


def test_rank_histogram_is_written_as_png(tmp_path):
    ranks = np.array([1, 1, 2, 7, 20, 1000])
    path = write_rank_histogram({"InterBERT": ranks, "w/o pretraining": ranks * 2}, tmp_path / "plots" / "ranks.png", 1000)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = write_rank_histogram(np.array([1]), tmp_path / "one.png")
    assert single.stat().st_size > 0
