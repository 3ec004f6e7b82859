"""The service under concurrent requests: every re-ranked answer equals the sequential one, whatever the
feature store, and the re-rank bound answers 503 + Retry-After when saturated (and only then)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from conftest import minilm_vocab
from interbert.cli import main as interbert_main
from interbert.errors import UsageError
from interbert.serve.index import build_index
from interbert.serve.service import create_app
from interbert.serve.synthetic_gallery import save_tiny_model

FEATURE_DIM = 16
CONCURRENT = 24
K = 10  # re-ranks the top 40 of the 48 images: most of the gallery is read by every request


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    vocab = minilm_vocab()
    return save_tiny_model(tmp_path_factory.mktemp("model"), vocab, FEATURE_DIM, architecture="retrieval")


@pytest.fixture(scope="module")
def synth_index(model, tmp_path_factory):
    """``synth_index(fmt)``: `interbert data synth` in feature layout ``fmt``, indexed with the tiny model,
    built once per module; returns (index folder, caption texts)."""
    built = {}

    def get(fmt: str):
        if fmt not in built:
            built[fmt] = _synth_index(tmp_path_factory.mktemp(fmt), model, fmt)
        return built[fmt]

    return get


def _synth_index(folder, model, fmt: str):
    assert interbert_main(["data", "synth", str(folder / "data"), "--images", "48", "--feature-dim", str(FEATURE_DIM),
                           "--num-classes", "8", "--no-images", "--workers", "1", "--format", fmt]) == 0
    data = folder / "data"
    regions = data / json.loads((data / "synth.json").read_text())["files"]["regions"]
    build_index(model, regions, folder / "index", progress=False)
    captions = json.loads((data / "captions.json").read_text())
    texts = [sentence["raw"] for image in captions["images"] for sentence in image["sentences"]]
    return folder / "index", texts


@pytest.mark.parametrize("fmt", ["tsv", "store"])
def test_concurrent_reranked_searches_equal_the_sequential_answers(model, synth_index, fmt):
    index, texts = synth_index(fmt)
    queries = texts[:CONCURRENT]
    app = create_app(index, model, max_concurrent_reranks=CONCURRENT, rerank_queue_timeout=120)
    with TestClient(app) as client:
        def search(query: str) -> tuple[int, dict]:
            response = client.post("/search", json={"query": query, "k": K, "rerank": True})
            return response.status_code, response.json()

        sequential = [search(q) for q in queries]
        assert all(status == 200 for status, _ in sequential)
        assert all(answer["candidates"] == 4 * K for _, answer in sequential)
        start = threading.Barrier(CONCURRENT)

        def at_once(query: str) -> tuple[int, dict]:
            start.wait()  # every request in flight together
            return search(query)

        for _ in range(2):
            with ThreadPoolExecutor(CONCURRENT) as pool:
                concurrent = list(pool.map(at_once, queries))
            for query, expected, got in zip(queries, sequential, concurrent):
                assert got == expected, f"{query!r}: concurrent answer differs from the sequential one"


def test_plain_searches_run_side_by_side_past_the_rerank_bound(model, synth_index):
    index, texts = synth_index("store")
    app = create_app(index, model, max_concurrent_reranks=1, rerank_queue_timeout=0)
    service = app.state.service
    real_embed_texts = service.model.embed_texts
    together = threading.Barrier(8, timeout=60)

    def embed_texts(texts):
        together.wait()  # passes only when 8 searches are inside at once: none was held back or refused
        return real_embed_texts(texts)

    with TestClient(app) as client:
        expected = [client.post("/search", json={"query": q, "k": K}).json() for q in texts[:8]]
        service.model.embed_texts = embed_texts
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda q: client.post("/search", json={"query": q, "k": K}), texts[:8]))
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json() for r in responses] == expected


@pytest.fixture
def blocking_app(model, synth_index):
    """An app whose re-ranks wait on ``release`` after setting ``entered``."""
    index, _ = synth_index("store")

    def make(**settings):
        app = create_app(index, model, **settings)
        service = app.state.service
        entered, release = threading.Event(), threading.Event()
        real_pair_scores = service.model.pair_scores

        def pair_scores(*args, **kwargs):
            entered.set()
            assert release.wait(60), "the test never released the re-rank"
            return real_pair_scores(*args, **kwargs)

        service.model.pair_scores = pair_scores
        return app, entered, release

    return make


def test_a_saturated_rerank_gets_503_with_retry_after_and_plain_search_still_answers(blocking_app):
    app, entered, release = blocking_app(max_concurrent_reranks=1, rerank_queue_timeout=0)
    body = {"query": "a red ball", "k": 3, "rerank": True}
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/search", json=body)
        assert entered.wait(60)
        try:
            refused = client.post("/search", json=body)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "busy: 1 re-ranked searches are running" in refused.json()["detail"]
            assert client.post("/search", json={**body, "rerank": False}).status_code == 200
        finally:
            release.set()
        assert first.result(60).status_code == 200
        assert client.post("/search", json=body).status_code == 200  # the slot is free again
        assert client.get("/health").json()["max_concurrent_reranks"] == 1


def test_a_rerank_waits_in_the_queue_for_a_slot_that_frees_in_time(blocking_app):
    app, entered, release = blocking_app(max_concurrent_reranks=1, rerank_queue_timeout=60)
    body = {"query": "a red ball", "k": 3, "rerank": True}
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/search", json=body)
        assert entered.wait(60)
        entered.clear()
        queued = pool.submit(client.post, "/search", json=body)
        assert not entered.wait(0.5)  # held at the gate, not running
        release.set()
        assert first.result(60).status_code == 200
        assert queued.result(60).status_code == 200


def test_bad_bounds_are_refused(model, synth_index, capsys):
    index, _ = synth_index("store")
    with pytest.raises(UsageError, match="max_concurrent_reranks must be >= 1"):
        create_app(index, model, max_concurrent_reranks=0)
    with pytest.raises(UsageError, match="rerank_queue_timeout must be >= 0"):
        create_app(index, model, rerank_queue_timeout=-1)
    for flag, value in (("--max-concurrent-reranks", "0"), ("--rerank-queue-timeout", "nan")):
        with pytest.raises(SystemExit) as exit_:
            interbert_main(["serve", "--index", str(index), flag, value])
        assert exit_.value.code == 2 and flag in capsys.readouterr().err
