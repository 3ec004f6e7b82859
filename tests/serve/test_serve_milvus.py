"""Milvus as the index engine (milvus-lite, the embedded Milvus, in a local file): the demo-sized gallery gives
the same exact top-10 as FAISS flat for every test caption; serve and topics build work on it; a wrong
engine says so in one line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import minilm_vocab, single_torch_thread
from interbert.cli import main as interbert_main
from interbert.errors import UsageError
from interbert.extras import MissingExtraError

for _module in ("pymilvus", "milvus_lite"):  # skipped with the CLI's own line for the missing extra
    pytest.importorskip(_module, reason=str(MissingExtraError("milvus", _module, "tests/serve/test_serve_milvus.py")))

from interbert.serve.engines import ivf_lists, parse_engine  # noqa: E402
from interbert.serve.index import ImageIndex, build_index  # noqa: E402
from interbert.serve.model import SearchModel  # noqa: E402
from interbert.serve.synthetic_gallery import save_tiny_model  # noqa: E402

FEATURE_DIM = 16
TEST_IMAGES = 80  # the demo's test split: 40 twin pairs, 5 captions each


def test_captions(captions_file) -> list[str]:
    data = json.loads(captions_file.read_text())
    return [s["raw"] for image in data["images"] if image["split"] == "test" for s in image["sentences"]]


test_captions.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def demo_gallery(tmp_path_factory):
    """The demo's test split (built-in benchmark) indexed twice with one model: FAISS flat, milvus-lite FLAT."""
    folder = tmp_path_factory.mktemp("milvus")
    data = folder / "data"
    with single_torch_thread():
        assert interbert_main(["data", "synth", str(data), "--images", str(TEST_IMAGES + 20), "--val-images", "10",
                               "--test-images", str(TEST_IMAGES), "--feature-dim", str(FEATURE_DIM), "--num-classes",
                               "8", "--no-images", "--workers", "1", "--format", "store"]) == 0
        files = json.loads((data / "synth.json").read_text())["files"]
        captions, regions = data / files["captions"], data / files["regions"]
        model = save_tiny_model(folder / "model", minilm_vocab(), FEATURE_DIM, architecture="retrieval")
        search_model = SearchModel(model)
        common = dict(captions=captions, split="test", index_type="flat", search_model=search_model, progress=False)
        build_index(model, regions, folder / "faiss", **common)
        build_index(model, regions, folder / "milvus", engine="milvus", **common)
        yield folder, model, search_model, captions, regions


def test_milvus_lite_flat_returns_the_exact_top_10_of_faiss_flat_for_every_test_caption(demo_gallery):
    folder, _, search_model, captions, _ = demo_gallery
    faiss_index, milvus_index = ImageIndex(folder / "faiss"), ImageIndex(folder / "milvus")
    assert milvus_index.engine.uri == "milvus" and (folder / "milvus" / "milvus.db").exists()
    assert not (folder / "milvus" / "index.faiss").exists()
    assert len(faiss_index) == len(milvus_index) == TEST_IMAGES
    texts = test_captions(captions)
    assert len(texts) == 5 * TEST_IMAGES
    with single_torch_thread():
        queries = search_model.embed_texts(texts)
    faiss_scores, faiss_rows = faiss_index.search(queries, 10)
    milvus_scores, milvus_rows = milvus_index.search(queries, 10)
    for n, text in enumerate(texts):
        faiss_ids = [r.image_id for r in faiss_index.records(faiss_rows[n])]
        milvus_ids = [r.image_id for r in milvus_index.records(milvus_rows[n])]
        assert milvus_ids == faiss_ids, f"caption {n} {text!r}"
    np.testing.assert_allclose(milvus_scores, faiss_scores, atol=1e-4)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_milvus_indexes_find_each_image_by_its_own_embedding(demo_gallery, tmp_path, index_type):
    folder, model, search_model, captions, regions = demo_gallery
    db = tmp_path / "gallery.db"
    report = build_index(model, regions, tmp_path / "idx", captions=captions, split="test", index_type=index_type,
                         search_model=search_model, progress=False, engine=f"milvus:{db}")
    assert report.index_type == index_type
    index = ImageIndex(tmp_path / "idx")
    assert index.engine.uri == f"milvus:{db.resolve()}" and index.index_type == index_type
    described = index.vectors.client.describe_index(index.vectors.collection, "embedding")
    assert (described["index_type"], described["metric_type"]) == ({"hnsw": "HNSW", "ivf": "IVF_FLAT"}[index_type], "IP")
    # FAISS's build parameters, not the engine's defaults (milvus-lite reads only the nested form of them)
    expected = {"hnsw": {"M": 32, "efConstruction": 80}, "ivf": {"nlist": ivf_lists(TEST_IMAGES)}}[index_type]
    assert {key: int(described["params"][key]) for key in expected} == expected
    rows = np.arange(1, TEST_IMAGES + 1)
    own = ImageIndex(folder / "faiss").faiss  # the same embeddings, by row
    vectors = np.stack([own.reconstruct(int(r)) for r in rows])
    _, found = index.search(vectors, 1)
    assert (found[:, 0] == rows).mean() >= 0.95  # approximate, but a vector's nearest image is itself


def test_serve_over_a_milvus_index_answers_search_like_faiss(demo_gallery):
    from fastapi.testclient import TestClient

    from interbert.serve.service import create_app

    folder, model, _, captions, _ = demo_gallery
    query = test_captions(captions)[7]
    answers = {}
    with single_torch_thread():
        for engine in ("faiss", "milvus"):
            with TestClient(create_app(folder / engine, model)) as client:
                health = client.get("/health").json()
                assert health["engine"] == engine and health["images"] == TEST_IMAGES
                response = client.post("/search", json={"query": query, "k": 10, "rerank": True})
                assert response.status_code == 200
                answers[engine] = response.json()
    assert [r["image_id"] for r in answers["milvus"]["results"]] == [r["image_id"] for r in answers["faiss"]["results"]]
    assert answers["milvus"]["candidates"] == answers["faiss"]["candidates"] == 40


def test_topics_build_on_a_milvus_index_gives_the_faiss_feed(demo_gallery, tmp_path):
    import sqlite3

    folder, _, _, _, _ = demo_gallery
    topics = tmp_path / "topics.txt"
    topics.write_text("red ball\nblue cube on the left\n")
    feeds = {}
    with single_torch_thread():
        for engine in ("faiss", "milvus"):
            feed = tmp_path / f"{engine}.sqlite"
            assert interbert_main(["topics", "build", "--topics", str(topics), "--index", str(folder / engine),
                                   "--out", str(feed), "--top", "5", "--no-progress"]) == 0
            with sqlite3.connect(feed) as db:
                feeds[engine] = db.execute("SELECT topic_id, rank, image_id FROM feed_items ORDER BY 1, 2").fetchall()
    assert len(feeds["milvus"]) == 10 and feeds["milvus"] == feeds["faiss"]


def test_cli_builds_a_milvus_index_and_says_which_engine(demo_gallery, tmp_path, capsys):
    folder, model, _, captions, regions = demo_gallery
    out = tmp_path / "idx"
    with single_torch_thread():
        assert interbert_main(["index", "build", "--model", str(model), "--features", str(regions), "--captions",
                               str(captions), "--split", "test", "--out", str(out), "--engine", "milvus"]) == 0
        assert f"{TEST_IMAGES} images" in capsys.readouterr().out
        # Re-indexing into FAISS (another engine) moves the vectors there without embedding again.
        assert interbert_main(["index", "add", "--index", str(out), "--features", str(regions), "--captions",
                               str(captions), "--split", "test", "--engine", "faiss"]) == 0
    printed = capsys.readouterr().out
    assert "0 added" in printed and "(faiss)" in printed
    assert ImageIndex(out).engine.kind == "faiss" and len(ImageIndex(out)) == TEST_IMAGES


def test_a_milvus_rebuild_that_fails_midway_keeps_serving_the_previous_vectors(demo_gallery, tmp_path, monkeypatch):
    from pymilvus import MilvusClient

    _, model, search_model, captions, regions = demo_gallery
    out = tmp_path / "idx"
    common = dict(captions=captions, split="test", search_model=search_model, progress=False, engine="milvus")
    build_index(model, regions, out, index_type="flat", **common)

    def full_disk(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(MilvusClient, "insert", full_disk)
    with pytest.raises(UsageError, match="milvus: writing the vectors failed.*No space left"):
        build_index(model, regions, out, index_type="hnsw", **common)
    monkeypatch.undo()
    index = ImageIndex(out)  # the alias still names the first build's complete collection
    assert (index.index_type, len(index)) == ("flat", TEST_IMAGES)
    index.close()
    build_index(model, regions, out, index_type="hnsw", **common)
    index = ImageIndex(out)
    assert (index.index_type, len(index)) == ("hnsw", TEST_IMAGES)
    assert index.vectors.client.list_collections() == ["images__3"]  # the failed build's leftover is gone


# ------------------------------------------------------------------------------------------------
# Errors: one line, naming the engine
# ------------------------------------------------------------------------------------------------
def test_an_unreachable_milvus_server_is_one_error_line_naming_it(demo_gallery, tmp_path, capsys):
    folder, model, _, _, regions = demo_gallery
    uri = "milvus://127.0.0.1:9/gallery"  # the discard port: nothing listens
    code = interbert_main(["index", "build", "--model", str(model), "--features", str(regions), "--out",
                           str(tmp_path / "idx"), "--engine", uri])
    err = capsys.readouterr().err
    assert code != 0 and uri in err and "cannot connect" in err and "Traceback" not in err
    assert not (tmp_path / "idx").exists()  # refused before any work


def test_a_missing_collection_and_a_dimension_mismatch_are_refused_naming_the_engine(demo_gallery, tmp_path):
    folder, model, _, captions, regions = demo_gallery
    empty = f"milvus:{tmp_path / 'empty.db'}"
    with pytest.raises(UsageError, match=f"{empty}.*'images' is not there"):
        ImageIndex(folder / "milvus", engine=empty)
    # Another model's vectors (another dimension) in the engine the folder is pointed at.
    other_model = save_tiny_model(tmp_path / "wide", minilm_vocab(), FEATURE_DIM, embedding_size=24)
    other_db = f"milvus:{tmp_path / 'wide.db'}"
    with single_torch_thread():
        build_index(other_model, regions, tmp_path / "wide_idx", captions=captions, split="test", progress=False,
                    engine=other_db)
    with pytest.raises(UsageError, match=rf"{other_db}.*24-d vectors.*embeds \d+-d"):
        ImageIndex(folder / "milvus", engine=other_db)


def test_serve_given_a_milvus_uri_as_index_says_to_name_the_folder(capsys):
    code = interbert_main(["serve", "--index", "milvus://db.example:19530/gallery"])
    err = capsys.readouterr().err
    assert code != 0 and "--engine" in err and "Traceback" not in err


def test_serve_refuses_engine_with_arms_each_arm_uses_its_folders_engine(capsys):
    code = interbert_main(["serve", "--arm", "control=a", "--arm", "treatment=b", "--engine", "milvus"])
    err = capsys.readouterr().err
    assert code == 2 and "--engine" in err and "Traceback" not in err


def test_engine_uris_are_checked_before_use(tmp_path):
    assert parse_engine(None, tmp_path).uri == "faiss"
    cluster = parse_engine("milvus://milvus.internal:19530/catalogue", tmp_path)
    assert (cluster.client_uri, cluster.collection) == ("http://milvus.internal:19530", "catalogue")
    for bad in ("milvus://host/gallery", "milvus://host:19530/bad-name", "milvus:gallery.sqlite", "annoy"):
        with pytest.raises(UsageError):
            parse_engine(bad, tmp_path)


def test_without_pymilvus_the_milvus_engine_names_the_extra(tmp_path, monkeypatch):
    from interbert.serve.engines import check_engine

    monkeypatch.setitem(sys.modules, "pymilvus", None)  # `import pymilvus` now fails as if not installed
    with pytest.raises(MissingExtraError, match=r"interbert\[milvus\]"):
        check_engine(parse_engine("milvus", tmp_path))
