"""The HTTP API through FastAPI's test client: search, re-ranking, images, the page, and every bound."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import minilm_vocab
from interbert.serve.index import build_index
from interbert.serve.service import MAX_BODY_BYTES, create_app, rerank_depth
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery

FEATURE_DIM = 16
NUM_IMAGES = 30
QUERY = "a dog runs on the beach"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    vocab = minilm_vocab()
    folder = tmp_path_factory.mktemp("served")
    ids = write_gallery(folder, num_images=NUM_IMAGES, feature_dim=FEATURE_DIM, seed=4)
    (folder / "images" / f"{ids[-1]}.png").unlink()  # one image without a thumbnail
    captions = folder / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image_id": i, "caption": f"caption of {i}"}) + "\n" for i in ids[:5]))
    model = save_tiny_model(folder / "model", vocab, FEATURE_DIM, architecture="retrieval")
    build_index(model, folder / "features", folder / "index", captions=captions, thumbnails=folder / "images",
                progress=False)
    app = create_app(folder / "index", model)
    with TestClient(app) as client:
        yield client, app.state.service, ids


def search(client, **body):
    return client.post("/search", json=body)


def test_health_reports_the_index(served):
    client, _, _ = served
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["images"] == NUM_IMAGES and body["index_type"] == "flat"
    assert body["scorer"] == "InterBertForImageTextRetrieval"


def test_search_returns_the_k_nearest_images_by_cosine(served):
    client, service, _ = served
    response = search(client, query=QUERY, k=7)
    assert response.status_code == 200
    results = response.json()["results"]
    # The same answer, brute force: the query's text embedding against every stored image embedding.
    text = service.model.embed_texts([QUERY])[0]
    rows = np.arange(1, NUM_IMAGES + 1)
    images = np.stack([service.index.faiss.reconstruct(int(r)) for r in rows])
    expected = [service.index.records([r])[0].image_id for r in rows[np.argsort(-(images @ text))[:7]]]
    assert [r["image_id"] for r in results] == expected
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(r["score"] == r["similarity"] for r in results)


def test_results_carry_captions_and_working_thumbnail_urls(served):
    from PIL import Image

    client, _, ids = served
    results = search(client, query=QUERY, k=NUM_IMAGES).json()["results"]
    by_id = {r["image_id"]: r for r in results}
    assert by_id[ids[0]]["caption"] == f"caption of {ids[0]}"
    assert "caption" not in by_id[ids[10]]
    assert "thumbnail_url" not in by_id[ids[-1]]
    image = client.get(by_id[ids[0]]["thumbnail_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(image.content)).size) <= 256


def test_rerank_orders_candidates_by_the_itm_score(served):
    client, service, _ = served
    k = 5
    plain = search(client, query=QUERY, k=k, rerank=False).json()
    reranked = search(client, query=QUERY, k=k, rerank=True).json()
    depth = rerank_depth(k)
    assert reranked["candidates"] == depth == 4 * k
    # Expected: the first stage's top `depth`, re-scored by the ITM head, best first.
    candidates = [r["image_id"] for r in search(client, query=QUERY, k=depth).json()["results"]]
    records = [service.index.record(i) for i in candidates]
    itm = service.model.pair_scores(QUERY, service.regions_of(records))
    expected = [candidates[i] for i in np.argsort(-itm, kind="stable")[:k]]
    assert [r["image_id"] for r in reranked["results"]] == expected
    np.testing.assert_allclose([r["score"] for r in reranked["results"]], np.sort(itm)[::-1][:k], rtol=1e-4, atol=1e-5)
    assert [r["image_id"] for r in reranked["results"]] != [r["image_id"] for r in plain["results"]]


def test_rerank_depth_grows_with_k_up_to_the_cap():
    assert rerank_depth(1) == 4
    assert rerank_depth(10, cap=200) == 40
    assert rerank_depth(100, cap=200) == 200
    assert rerank_depth(100, cap=50) == 100  # never fewer candidates than answers


def test_k_larger_than_the_gallery_returns_every_image(served):
    client, _, _ = served
    assert len(search(client, query=QUERY, k=100, rerank=True).json()["results"]) == NUM_IMAGES


def test_unknown_image_ids_are_404(served):
    client, _, ids = served
    for path in ("/images/no-such-image", f"/images/{ids[-1]}", "/images/..%2Fmeta.sqlite", "/images/../index.json"):
        response = client.get(path)
        assert response.status_code == 404, path


@pytest.mark.parametrize(
    "body, message",
    [
        ({"query": QUERY, "k": 0}, "greater than or equal to 1"),
        ({"query": QUERY, "k": 101}, "less than or equal to 100"),
        ({"query": QUERY, "k": "5"}, "valid integer"),
        ({"query": QUERY, "k": 2.5}, "valid integer"),
        ({"query": QUERY, "rerank": "yes"}, "valid boolean"),
        ({"query": ""}, "at least 1 character"),
        ({"query": "  \t "}, "blank"),
        ({"query": "x" * 513}, "at most 512 characters"),
        ({"k": 3}, "query: Field required"),
        ({"query": QUERY, "limit": 3}, "limit: Extra inputs are not permitted"),
        ([QUERY], "valid dictionary"),
    ],
)
def test_bad_search_requests_are_422_with_a_message(served, body, message):
    client, _, _ = served
    response = client.post("/search", json=body)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_the_longest_allowed_query_is_answered(served):
    client, _, _ = served
    assert search(client, query="dog " * 128, k=1).status_code == 200


def test_malformed_json_is_422(served):
    client, _, _ = served
    response = client.post("/search", content=b'{"query": "dog", "k": ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "malformed JSON" in response.json()["detail"]


def test_oversize_bodies_are_413_with_or_without_content_length(served):
    client, _, _ = served
    padding = json.dumps({"query": "dog", "padding": "x" * MAX_BODY_BYTES}).encode()
    declared = client.post("/search", content=padding, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "over" in declared.json()["detail"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(padding), 1000):
            yield padding[start : start + 1000]

    streamed = client.post("/search", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_the_page_has_a_search_box_and_a_results_grid(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="query"' in page.text and 'id="results"' in page.text and "fetch(\"/search\"" in page.text


def test_a_pretraining_checkpoint_reranks_by_the_itm_margin(tmp_path):
    vocab = minilm_vocab()
    write_gallery(tmp_path, num_images=6, feature_dim=FEATURE_DIM, seed=5, images=False)
    model = save_tiny_model(tmp_path / "model", vocab, FEATURE_DIM, architecture="pretraining")
    build_index(model, tmp_path / "features", tmp_path / "index", progress=False)
    app = create_app(tmp_path / "index", model)
    service = app.state.service
    results = TestClient(app).post("/search", json={"query": QUERY, "k": 6, "rerank": True}).json()["results"]
    records = [service.index.record(r["image_id"]) for r in results]
    inputs = {**service.regions_of(records), **{k: v.expand(len(records), -1) for k, v in service.model.tokenize([QUERY]).items()}}
    itm = service.model.model(**inputs).itm_logits.detach()
    np.testing.assert_allclose([r["score"] for r in results], (itm[:, 1] - itm[:, 0]).numpy(), rtol=1e-4, atol=1e-5)


def test_serving_with_another_model_than_the_index_was_built_with_fails_at_start(served, tmp_path):
    _, service, _ = served
    vocab = minilm_vocab()
    other = save_tiny_model(tmp_path / "other", vocab, FEATURE_DIM, seed=7)
    with pytest.raises(ValueError, match="different weights"):
        create_app(service.index.folder, other)


def test_thumbnail_urls_work_for_ids_with_url_special_characters(tmp_path):
    vocab = minilm_vocab()
    ids = write_gallery(tmp_path, num_images=2, feature_dim=FEATURE_DIM, seed=8, id_prefix="beach day #2?&")
    model = save_tiny_model(tmp_path / "model", vocab, FEATURE_DIM)
    build_index(model, tmp_path / "features", tmp_path / "index", thumbnails=tmp_path / "images", progress=False)
    client = TestClient(create_app(tmp_path / "index", model))
    results = client.post("/search", json={"query": QUERY, "k": 2}).json()["results"]
    assert {r["image_id"] for r in results} == set(ids)
    for r in results:
        assert client.get(r["thumbnail_url"]).status_code == 200
