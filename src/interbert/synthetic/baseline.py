"""A text-only, bag-of-words retrieval baseline: what can be done without binding words to regions.

Each image is represented by the words a perfect but *unbound* detector could name (every object's
size, colour and kind words, synonyms and plurals included); each caption is matched to images by
TF-IDF cosine. Ties are counted against the baseline (a caption is at rank 1 only when its own
image scores strictly higher than every other), so the numbers are upper bounds on what ties give.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np


def tfidf_scores(queries: list[list[str]], documents: list[list[str]]) -> np.ndarray:
    """Cosine similarity of TF-IDF vectors (idf from the documents): queries x documents."""
    document_frequency = Counter(word for doc in documents for word in set(doc))
    n = len(documents)
    idf = {w: math.log((1 + n) / (1 + df)) + 1.0 for w, df in document_frequency.items()}
    vocabulary = {w: k for k, w in enumerate(sorted(idf))}

    def vectors(texts: list[list[str]]) -> np.ndarray:
        out = np.zeros((len(texts), len(vocabulary)))
        for row, text in enumerate(texts):
            for word, count in Counter(text).items():
                if word in vocabulary:
                    out[row, vocabulary[word]] = count * idf[word]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)

    return vectors(queries) @ vectors(documents).T


def bag_of_words_retrieval(
    caption_tokens: list[list[str]],
    caption_image: list[int],
    image_words: list[list[str]],
    twin_of: list[int | None],
) -> dict[str, float]:
    """Image retrieval from captions over a split's images (index positions), plus the two-way
    choice between each twin and its twin. Ties count against the baseline."""
    scores = tfidf_scores(caption_tokens, image_words)
    own = scores[np.arange(len(caption_image)), caption_image]
    # Rank = number of images scoring at least as high as the right one, itself included: any tie
    # pushes the right image down.
    ranks = (scores >= own[:, None]).sum(axis=1)
    result = {
        "captions": len(caption_image),
        "images": len(image_words),
        "R@1": float(np.mean(ranks <= 1)),
        "R@5": float(np.mean(ranks <= 5)),
        "R@10": float(np.mean(ranks <= 10)),
        "median_rank": float(np.median(ranks)),
    }
    twin_rows = [k for k, image in enumerate(caption_image) if twin_of[image] is not None]
    if twin_rows:
        rows = np.array(twin_rows)
        twins = np.array([twin_of[caption_image[k]] for k in twin_rows])
        wins = scores[rows, np.array(caption_image)[rows]] > scores[rows, twins]
        ties = scores[rows, np.array(caption_image)[rows]] == scores[rows, twins]
        result["twin_captions"] = len(twin_rows)
        result["twin_R@1"] = float(np.mean(wins))
        result["twin_ties"] = float(np.mean(ties))
        # With ties broken by a fair coin instead of against the baseline.
        result["twin_R@1_coin"] = float(np.mean(wins + 0.5 * ties))
    return result
