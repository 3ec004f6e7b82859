"""Query bounds as the API states them: a query's length is counted in characters (an emoji query of 512
characters is answered however the client escapes it, 513 is 422), and a query with no visible character
(only NUL, control, zero-width or combining characters) is refused with 422, in both services."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from conftest import minilm_vocab
from interbert.serve.abtest import ArmSpec
from interbert.serve.experiment import create_experiment_app
from interbert.serve.index import build_index
from interbert.serve.service import MAX_QUERY_CHARS, create_app
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery

FEATURE_DIM = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("queries")
    write_gallery(folder, num_images=4, feature_dim=FEATURE_DIM, seed=3, images=False)
    model = save_tiny_model(folder / "model", minilm_vocab(), FEATURE_DIM, architecture="retrieval")
    build_index(model, folder / "features", folder / "index", progress=False)
    return folder, model


@pytest.fixture(scope="module")
def client(built):
    folder, model = built
    with TestClient(create_app(folder / "index", model)) as client:
        yield client


def escaped_body(query: str) -> bytes:
    # ensure_ascii: every emoji becomes "\ud83d\ude00", 12 bytes: the largest a character can be in JSON
    return json.dumps({"query": query, "k": 2}, ensure_ascii=True).encode()


def test_a_maximal_emoji_query_is_answered_and_one_more_character_is_422(client):
    body = escaped_body("\U0001F600" * MAX_QUERY_CHARS)
    assert len(body) > 12 * MAX_QUERY_CHARS
    response = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    longer = client.post("/search", content=escaped_body("\U0001F600" * (MAX_QUERY_CHARS + 1)),
                         headers={"content-type": "application/json"})
    assert longer.status_code == 422 and "at most 512 characters" in longer.json()["detail"]


@pytest.mark.parametrize("query", ["\x00", "\x00\x00\x00", "\x01\x7f\x1b", "\u200b", "\u200b\u200c\u200d",
                                   "\u2060\ufeff", " \u200b \x00 ", "\u3164", "\u0301\u0301", "\u2800"])
def test_a_query_with_no_visible_character_is_422(client, query):
    response = client.post("/search", json={"query": query})
    assert response.status_code == 422 and "no visible character" in response.json()["detail"]


@pytest.mark.parametrize("query", ["dog", "\u200bdog", "\U0001F436", "狗", "?"])
def test_queries_with_something_visible_are_answered(client, query):
    assert client.post("/search", json={"query": query, "k": 1}).status_code == 200


def test_the_ab_service_refuses_invisible_queries_and_takes_maximal_emoji_ones(built, tmp_path):
    folder, _ = built
    app = create_experiment_app([ArmSpec("control", folder / "index"), ArmSpec("treatment", folder / "index")],
                                [0.5, 0.5], "exp", tmp_path / "events.sqlite")
    with TestClient(app) as client:
        response = client.post("/search", json={"query": "\u200b\x00"})  # no user id: the service assigns one
        assert response.status_code == 422 and "no visible character" in response.json()["detail"]
        response = client.post("/search", content=escaped_body("\U0001F600" * MAX_QUERY_CHARS),
                               headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
