"""Full-protocol and two-stage scoring give the model's own pair scores, computed efficiently."""

import numpy as np
import torch

from interbert.config import InterBertConfig
from interbert.convert import retrieval_from_pretraining
from interbert.modeling import InterBertForPreTraining
from interbert.retrieval import RegionInput, embedding_similarity, score_pairs, two_stage_scores

D = 12


def _model():
    torch.manual_seed(0)
    cfg = InterBertConfig(
        vocab_size=40, hidden_size=16, num_attention_heads=2, intermediate_size=24,
        num_single_stream_layers=1, num_text_stream_layers=1, num_image_stream_layers=1,
        image_num_attention_heads=2, image_intermediate_size=24, region_feature_size=D,
        num_region_classes=5, pooled_size=8, max_position_embeddings=16,
    )
    return InterBertForPreTraining(cfg).eval()


def _data(n_captions=7, n_images=5, seed=0):
    rng = np.random.default_rng(seed)
    captions = [[1, *rng.integers(3, 40, rng.integers(2, 9)).tolist(), 2] for _ in range(n_captions)]
    images = []
    for _ in range(n_images):
        r = int(rng.integers(2, 6))
        images.append(RegionInput(rng.normal(size=(r, D)).astype(np.float32), rng.random((r, 5)).astype(np.float32)))
    return captions, images


def _direct_scores(model, captions, images):
    out = np.zeros((len(captions), len(images)), dtype=np.float32)
    with torch.no_grad():
        for c, ids in enumerate(captions):
            for i, im in enumerate(images):
                o = model(input_ids=torch.tensor([ids]), region_features=torch.tensor(im.features)[None],
                          region_boxes=torch.tensor(im.boxes)[None])
                if hasattr(o, "itm_logits") and o.itm_logits is not None:
                    out[c, i] = float(o.itm_logits[0, 1] - o.itm_logits[0, 0])
                else:
                    out[c, i] = float(o.logits[0])
    return out


def test_full_protocol_scores_equal_one_pair_at_a_time_forwards():
    model = _model()
    captions, images = _data()
    report = score_pairs(model, captions, images, pair_batch_size=6, progress=False)
    assert report.pair_forwards == 35
    np.testing.assert_allclose(report.scores, _direct_scores(model, captions, images), atol=1e-5)
    retrieval = retrieval_from_pretraining(model).eval()
    np.testing.assert_allclose(
        score_pairs(retrieval, captions, images, progress=False).scores, _direct_scores(retrieval, captions, images), atol=1e-5
    )


def test_two_stage_scores_only_the_top_k_and_ranks_them_first():
    model = _model()
    captions, images = _data()
    sim = embedding_similarity(model, captions, images)
    report = two_stage_scores(model, captions, images, k=2, progress=False)
    assert report.pair_forwards == 2 * len(captions)
    full = score_pairs(model, captions, images, progress=False).scores
    for c in range(len(captions)):
        top2 = set(np.argsort(-sim[c])[:2])
        ranked = list(np.argsort(-report.scores[c]))
        assert set(ranked[:2]) == top2
        # inside the candidates, the cross-encoder decides
        a, b = ranked[:2]
        assert full[c, a] >= full[c, b]
        # outside, the embedding similarity
        rest = ranked[2:]
        assert list(rest) == sorted(rest, key=lambda i: -sim[c, i])
