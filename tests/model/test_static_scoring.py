"""Pair scoring on static shapes (issue 26): the full protocol, its two-stage variant and the service's re-rank
padded to buckets, in the static-shape mode, optionally compiled, give today's eager scores, ranks and metrics;
the scorer captures as one graph. The compiled cases compile one small graph each (15-30 s on 2 busy CPU cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_retrieval import _data, _model

from interbert.convert import retrieval_from_pretraining
from interbert.evaluate import image_retrieval_ranks, retrieval_metrics
from interbert.retrieval import _pad, pair_scorer, score_pairs, static_scorer, two_stage_scores
from interbert.static_scoring import StaticPairScorer, doubling_edges

ATOL = 1e-6


def _models():
    pretraining = _model()
    return {"zero-shot ITM": pretraining, "retrieval": retrieval_from_pretraining(pretraining).eval()}


def _truth(captions, images):
    """Each caption's image (any assignment: the metrics of the two paths are compared, not their values)."""
    return np.random.default_rng(3).integers(0, len(images), len(captions))


def test_doubling_edges_end_at_the_cap_and_a_size_pads_to_the_smallest_that_fits():
    assert doubling_edges(64) == [8, 16, 32, 64]
    assert doubling_edges(37) == [8, 16, 32, 37]  # an index's max_regions is the last edge, whatever it is
    assert doubling_edges(5) == [5]
    with pytest.raises(ValueError, match="largest bucket"):
        doubling_edges(0)


def test_the_scorer_pads_rows_tokens_and_regions_to_buckets_and_scores_only_the_real_pairs():
    model = _models()["retrieval"]
    captions, images = _data(5, 5, seed=1)
    texts, text_keep = _pad([model.interbert.embeddings(torch.tensor([c]), None)[0] for c in captions])
    regions = [model.interbert.region_embeddings(torch.tensor(im.features)[None], torch.tensor(im.boxes)[None])[0]
               for im in images]
    image, image_keep = _pad(regions)
    scorer = StaticPairScorer(model.interbert, pair_scorer(model), row_edges=[8, 16], text_edges=[12, 16],
                              region_edges=[8])
    with torch.no_grad():
        eager = model.interbert.encode(texts, text_keep, image, image_keep)
        expected = pair_scorer(model)(eager.text_pooled, eager.image_pooled)
        static = scorer(texts, text_keep, image, image_keep)
    assert static.shape == (5,)
    assert scorer.shapes == {(8, 12, 8)}  # 5 pairs -> 8 rows, <= 10 tokens -> 12, <= 5 regions -> 8
    torch.testing.assert_close(static, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["zero-shot ITM", "retrieval"])
def test_static_evaluation_gives_todays_scores_ranks_and_metrics(kind):
    model = _models()[kind]
    captions, images = _data(11, 7, seed=2)
    truth = _truth(captions, images)
    # 6 pairs per batch: caption blocks of 6 and 5, so rows, tokens and regions all meet more than one bucket
    eager = score_pairs(model, captions, images, pair_batch_size=6, progress=False)
    static = score_pairs(model, captions, images, pair_batch_size=6, progress=False, static_shapes=True)
    assert static.pair_forwards == eager.pair_forwards == 77 and eager.shapes is None and static.shapes >= 2
    np.testing.assert_allclose(static.scores, eager.scores, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(image_retrieval_ranks(static.scores, truth), image_retrieval_ranks(eager.scores, truth))
    assert retrieval_metrics(static.scores, truth) == retrieval_metrics(eager.scores, truth)
    # the two-stage variant's subset of pairs: row counts that are not a batch's, padded too
    staged = [two_stage_scores(model, captions, images, k=3, pair_batch_size=6, progress=False, static_shapes=s)
              for s in (False, True)]
    np.testing.assert_allclose(staged[1].scores, staged[0].scores, atol=ATOL, rtol=0)
    assert retrieval_metrics(staged[1].scores, truth) == retrieval_metrics(staged[0].scores, truth)


def test_compiled_evaluation_gives_todays_scores_ranks_and_metrics():
    model = _models()["zero-shot ITM"]
    captions, images = _data(9, 6, seed=4)
    truth = _truth(captions, images)
    eager = score_pairs(model, captions, images, pair_batch_size=16, progress=False)
    compiled = score_pairs(model, captions, images, pair_batch_size=16, progress=False, compile="default")
    assert compiled.shapes == 1  # 9 captions x 1 image per batch: one (16, tokens, regions) graph for the run
    np.testing.assert_allclose(compiled.scores, eager.scores, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(image_retrieval_ranks(compiled.scores, truth), image_retrieval_ranks(eager.scores, truth))
    assert retrieval_metrics(compiled.scores, truth) == retrieval_metrics(eager.scores, truth)


@pytest.mark.parametrize("kind", ["zero-shot ITM", "retrieval"])
def test_the_scorer_captures_as_one_graph(kind):
    model = _models()[kind]
    captions, images = _data(6, 4, seed=5)
    scorer = static_scorer(model, captions, images, pair_batch_size=8)
    texts, text_keep = _pad([model.interbert.embeddings(torch.tensor([c]), None)[0] for c in captions])
    image, image_keep = _pad([model.interbert.region_embeddings(torch.tensor(im.features)[None],
                                                                torch.tensor(im.boxes)[None])[0] for im in images[:1]])
    with torch.no_grad():
        explained = torch._dynamo.explain(scorer.static_scores)(texts, text_keep, image.expand(6, -1, -1),
                                                                image_keep.expand(6, -1))
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_a_scorer_compile_mode_must_be_known_and_cuda_modes_need_cuda():
    model = _models()["retrieval"]
    with pytest.raises(ValueError, match="compile must be one of"):
        StaticPairScorer(model.interbert, pair_scorer(model), compile="fast")
    with pytest.raises(ValueError, match="compile=reduce-overhead is a CUDA mode"):
        StaticPairScorer(model.interbert, pair_scorer(model), compile="reduce-overhead")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    from conftest import minilm_vocab
    from fixture_writers import write_gallery

    from interbert.serve.index import build_index
    from interbert.serve.synthetic_gallery import save_tiny_model

    folder = tmp_path_factory.mktemp("static_rerank")
    write_gallery(folder, num_images=30, feature_dim=16, seed=4, images=False)
    model = save_tiny_model(folder / "model", minilm_vocab(), 16, architecture="pretraining")
    build_index(model, folder / "features", folder / "index", progress=False)
    return folder / "index"


def test_a_compiled_rerank_gives_todays_top_k_and_scores(gallery):
    from fastapi.testclient import TestClient

    from interbert.serve.service import create_app

    query = {"query": "a dog runs on the beach", "k": 5, "rerank": True}
    today = TestClient(create_app(gallery)).post("/search", json=query).json()
    app = create_app(gallery, compile="default")
    compiled = TestClient(app).post("/search", json=query).json()
    assert compiled["candidates"] == today["candidates"] == 20
    assert [r["image_id"] for r in compiled["results"]] == [r["image_id"] for r in today["results"]]
    np.testing.assert_allclose([r["score"] for r in compiled["results"]], [r["score"] for r in today["results"]],
                               atol=ATOL, rtol=0)
    # 20 candidates padded to 32 rows: the one graph this query needed
    assert [rows for rows, _, _ in app.state.service.model.static_scorer.shapes] == [32]


@pytest.fixture(scope="module")
def split_and_model(tmp_path_factory):
    """12 synthetic images (5 captions each, 16-d features) and a small untrained pretraining folder for them."""
    from interbert.config import InterBertConfig
    from interbert.data.captions import read_captions
    from interbert.data.tokenize import train_wordpiece
    from interbert.modeling import InterBertForPreTraining
    from interbert.synthetic import generate

    root = tmp_path_factory.mktemp("static_eval")
    generate(root / "data", images=12, seed=0, feature_dim=16, num_classes=8, workers=1, render_images=False)
    folder = root / "model"
    tokenizer = train_wordpiece([c.text for c in read_captions(root / "data" / "captions.json")], folder, vocab_size=120)
    torch.manual_seed(0)
    InterBertForPreTraining(InterBertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_attention_heads=2, intermediate_size=24,
        num_single_stream_layers=1, num_text_stream_layers=1, num_image_stream_layers=1, image_num_attention_heads=2,
        image_intermediate_size=24, region_feature_size=16, num_region_classes=8, pooled_size=8,
        max_position_embeddings=40)).save_pretrained(folder)
    return root / "data", folder


@pytest.mark.slow  # ~30 s on 2 busy cores, nearly all of it inductor compiling; the fast tests above hold the scores
def test_evaluate_retrieval_compile_default_reports_todays_metrics(split_and_model, capsys):
    import json

    from interbert.cli import main

    data, folder = split_and_model
    args = ["evaluate", "retrieval", "--model", str(folder), "--captions", str(data / "captions.json"), "--features",
            str(data / "regions.tsv"), "--zero-shot", "--split", "all", "--max-images", "3", "--device", "cpu"]
    results = {}
    for mode in ("off", "default"):
        capsys.readouterr()
        assert main([*args, "--compile", mode]) == 0
        results[mode] = json.loads(capsys.readouterr().out)
    assert results["off"]["compile"] == "off" and "shapes" not in results["off"]
    assert results["default"]["compile"] == "default" and results["default"]["shapes"] >= 1
    for key in ("image_retrieval", "text_retrieval", "rsum", "pair_forwards"):
        assert results["default"][key] == results["off"][key], key


@pytest.mark.slow  # compiles, as above
def test_a_recipes_validation_with_train_compile_scores_as_without(split_and_model):
    from interbert.data.tokenize import load_tokenizer
    from interbert.loading import load_model
    from interbert.recipes.common import captions_of_split, feature_store
    from interbert.recipes.validation import retrieval_eval_fn

    data, folder = split_and_model
    captions = captions_of_split(data / "captions.json", None, 3)
    store, tokenizer = feature_store(data / "regions.tsv"), load_tokenizer(folder)
    model = load_model(folder, task="scoring").eval()
    off = retrieval_eval_fn(captions, store, tokenizer, 36, 36, compile="off")(model)
    torch._dynamo.reset()  # a fresh cache: the graph below is this validation's own
    torch._dynamo.utils.counters.clear()
    compiled = retrieval_eval_fn(captions, store, tokenizer, 36, 36, compile="default")(model)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did run through torch.compile
    assert compiled == off and set(off) >= {"ir_r1", "tr_r1", "rsum"}


@pytest.mark.parametrize("arms", [False, True])
def test_serve_compile_reaches_the_rerank_of_the_index_or_of_every_arm(gallery, arms, tmp_path):
    from interbert.cli import build_parser
    from interbert.serve.cli import build_serve_app

    where = (["--arm", f"a={gallery}", "--arm", f"b={gallery}", "--events", str(tmp_path / "events.sqlite")] if arms
             else ["--index", str(gallery)])
    threads = torch.get_num_threads()
    try:
        scorers = {}
        for flags in ([], ["--compile", "off"], ["--compile", "default"]):
            app, _ = build_serve_app(build_parser().parse_args(["serve", *where, *flags]))
            services = [arm.service for arm in app.state.arms.values()] if arms else [app.state.service]
            scorers[tuple(flags)] = [service.model.static_scorer for service in services]
    finally:
        torch.set_num_threads(threads)  # serve sets its own
    assert scorers[()] == scorers[("--compile", "off")] == [None] * (2 if arms else 1)  # today's re-rank by default
    assert [s.compile for s in scorers[("--compile", "default")]] == ["default"] * (2 if arms else 1)
