"""`interbert embed`: the vectors it writes are the search service's (FAISS over them gives the service's
top-10), a run stopped half-way resumes to the same files as one run, and bad input is one line."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import faiss
import numpy as np
import pytest

from conftest import minilm_vocab
from interbert.cli import main as interbert_main
from interbert.data import open_features, read_captions
from interbert.embedding import CHUNKS, embed, read_embeddings, read_texts
from interbert.errors import DataError, UsageError

FEATURE_DIM = 16


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The built-in benchmark (store format), a tiny retrieval model and an index built over every image."""
    from interbert.serve.index import build_index
    from interbert.serve.synthetic_gallery import save_tiny_model
    from interbert.synthetic import generate

    root = tmp_path_factory.mktemp("embed")
    generate(root / "data", images=16, val_images=2, test_images=6, feature_dim=FEATURE_DIM, num_classes=8,
             fmt="store", render_images=False, workers=1)
    model = save_tiny_model(root / "model", minilm_vocab(), FEATURE_DIM, embedding_size=8)
    build_index(model, root / "data" / "regions", root / "index", captions=root / "data" / "captions.json", progress=False)
    return root, model


def files_of(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "embed.json"}


def test_faiss_over_the_embeddings_gives_the_services_top10(bench, tmp_path):
    from interbert.serve.service import SearchService

    root, model = bench
    report = embed(model, tmp_path / "out", texts=root / "data" / "captions.json", features=root / "data" / "regions",
                   split="test", batch_size=5, chunk_size=8, progress=False)
    text_ids, texts = read_embeddings(tmp_path / "out", "texts")
    image_ids, images = read_embeddings(tmp_path / "out", "images")
    test = [c for c in read_captions(root / "data" / "captions.json") if c.split == "test"]
    assert text_ids == [c.caption_id for c in test] and report.counts == {"texts": len(test), "images": 16}
    assert image_ids == open_features(root / "data" / "regions").ids() and images.shape == (16, 8)

    gallery = faiss.IndexFlatIP(images.shape[1])
    gallery.add(images)
    _, found = gallery.search(texts, 10)
    service = SearchService(root / "index")
    # the very vectors the index holds, not merely the same ranking
    with sqlite3.connect(root / "index" / "meta.sqlite") as db:
        stored = {i: np.frombuffer(blob, dtype=np.float32) for i, blob in db.execute("SELECT image_id, embedding FROM images")}
    assert sorted(stored) == sorted(image_ids)
    np.testing.assert_allclose(images, np.stack([stored[i] for i in image_ids]), rtol=0, atol=1e-6)
    for caption, row in zip(test, found):
        first_stage = [hit.image_id for hit in service.search(caption.text, 10, rerank=False).results]
        assert [image_ids[j] for j in row] == first_stage, caption.text


def test_parquet_holds_the_same_rows_as_npy(bench, tmp_path):
    import pyarrow.parquet as pq

    root, model = bench
    (tmp_path / "queries.txt").write_text("a red ball\ntwo small cubes\n\u00e9t\u00e9 green\n", encoding="utf-8")
    for fmt in ("npy", "parquet"):
        embed(model, tmp_path / fmt, texts=tmp_path / "queries.txt", features=root / "data" / "regions",
              output_format=fmt, progress=False)
    for kind in ("texts", "images"):
        ids, vectors = read_embeddings(tmp_path / "npy", kind)
        got_ids, got = read_embeddings(tmp_path / "parquet", kind)
        assert got_ids == ids and np.array_equal(got, vectors)
    assert read_embeddings(tmp_path / "npy", "texts")[0] == ["1", "2", "3"]  # line numbers
    assert pq.read_schema(tmp_path / "parquet" / "texts.parquet").names == ["id", "embedding"]
    assert sorted(p.name for p in (tmp_path / "parquet").iterdir()) == ["embed.json", "images.parquet", "texts.parquet"]


def test_a_run_stopped_by_a_failing_write_resumes_to_the_same_files(bench, tmp_path, monkeypatch):
    from interbert import embedding

    root, model = bench
    inputs = dict(texts=root / "data" / "captions.json", features=root / "data" / "regions", chunk_size=7,
                  batch_size=3, progress=False)
    embed(model, tmp_path / "once", **inputs)

    real_write, writes = embedding.atomic_write, []

    def write_then_fail(path, write):  # the disk fills up at the third chunk
        writes.append(path.name)
        if len(writes) == 3:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, write)

    monkeypatch.setattr(embedding, "atomic_write", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        embed(model, tmp_path / "resumed", **inputs)
    monkeypatch.setattr(embedding, "atomic_write", real_write)
    chunks = tmp_path / "resumed" / CHUNKS
    assert sorted(p.name for p in chunks.iterdir()) == sorted(writes[:2])  # finished chunks, no temporary
    # a writer killed mid-chunk leaves its temporary file; a chunk damaged on disk is embedded again
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (chunks / f".{writes[2]}.tmp-{dead}-1").write_bytes(b"\x93NUMPY half a chunk")
    (chunks / writes[1]).write_bytes((chunks / writes[1]).read_bytes()[:100])

    report = embed(model, tmp_path / "resumed", **inputs)
    assert report.chunks_reused == 1  # the first chunk; the damaged second one is embedded again
    assert report.chunks_embedded == sum(-(-n // 7) for n in report.counts.values()) - 1
    assert files_of(tmp_path / "resumed") == files_of(tmp_path / "once")
    assert not chunks.exists()  # the chunks are in the output files now
    again = embed(model, tmp_path / "resumed", **inputs)  # a finished folder is left as it is
    assert (again.chunks_embedded, again.chunks_reused) == (0, 0) and files_of(tmp_path / "resumed") == files_of(tmp_path / "once")


def test_resuming_with_another_model_or_other_inputs_is_refused(bench, tmp_path, monkeypatch):
    from interbert import embedding
    from interbert.serve.synthetic_gallery import save_tiny_model

    root, model = bench
    (tmp_path / "a.txt").write_text("a red ball\na blue cube\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("a red ball\na green cube\n", encoding="utf-8")
    monkeypatch.setattr(embedding, "_assemble", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # stopped after its chunks, before the output files
        embed(model, tmp_path / "out", texts=tmp_path / "a.txt", progress=False)
    monkeypatch.undo()
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    other = save_tiny_model(tmp_path / "other", minilm_vocab(), FEATURE_DIM, seed=1, embedding_size=8)
    with pytest.raises(UsageError, match=r"another model \(weights sha256 [0-9a-f]{12}\.\.\..*embed into a new folder"):
        embed(other, tmp_path / "out", texts=tmp_path / "a.txt", progress=False)
    with pytest.raises(UsageError, match=r"other inputs: texts: sha256 [0-9a-f]{12}\.\.\. then, [0-9a-f]{12}\.\.\. now"):
        embed(model, tmp_path / "out", texts=tmp_path / "b.txt", progress=False)
    with pytest.raises(UsageError, match="other inputs: images: none then, some now"):
        embed(model, tmp_path / "out", texts=tmp_path / "a.txt", features=root / "data" / "regions", progress=False)
    with pytest.raises(UsageError, match="--chunk-size 4096, not 1"):
        embed(model, tmp_path / "out", texts=tmp_path / "a.txt", chunk_size=1, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert embed(model, tmp_path / "out", texts=tmp_path / "a.txt", batch_size=1, progress=False).chunks_reused == 1


def test_texts_come_from_lines_or_any_caption_layout(tmp_path):
    (tmp_path / "lines.txt").write_text("\ufeff[a bracket first]\nplain\n", encoding="utf-8")
    assert read_texts(tmp_path / "lines.txt", "lines") == (["1", "2"], ["[a bracket first]", "plain"])
    (tmp_path / "c.jsonl").write_text('{"image_id": "7", "caption": "a cube"}\n{"image_id": "8", "caption": "a ball"}\n')
    ids, texts = read_texts(tmp_path / "c.jsonl")
    assert texts == ["a cube", "a ball"] and len(set(ids)) == 2
    (tmp_path / "flickr.token.txt").write_text("1.jpg#0\ta dog runs\n1.jpg#1\ta dog\n")
    assert read_texts(tmp_path / "flickr.token.txt")[1] == ["a dog runs", "a dog"]
    with pytest.raises(UsageError, match="plain text"):
        read_texts(tmp_path / "lines.txt", "lines", split="test")
    # auto reads a first line starting with "[" as JSON, and says where it is not; --text-format lines reads it
    with pytest.raises(DataError, match="lines.txt:1: malformed JSON"):
        read_texts(tmp_path / "lines.txt")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = interbert_main(["embed", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return code, lines[0]


def test_bad_inputs_are_one_line(bench, tmp_path, capsys):
    root, model = bench
    regions = str(root / "data" / "regions")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("a cube\n\n  \na ball\n")
    (tmp_path / "ids.txt").write_text("0\n1\nno-such-image\n")
    (tmp_path / "ok.txt").write_text("a cube\n")
    out = str(tmp_path / "out")
    cases = [
        (["--texts", str(tmp_path / "empty.txt")], 1, "empty.txt: empty file: no texts"),
        (["--texts", str(tmp_path / "blank.txt")], 1, "blank.txt: 2 blank line(s) (a text per line; nothing to embed): lines 2, 3"),
        (["--features", regions, "--image-ids", str(tmp_path / "ids.txt")], 1,
         f"ids.txt:3: image id 'no-such-image' is not in the feature store {regions}"),
        (["--texts", str(tmp_path / "absent.txt")], 2, "absent.txt: no such texts file"),
        ([], 2, "nothing to embed: give texts (--texts FILE), images (--features STORE), or both"),
    ]
    for extra, want_code, want in cases:
        code, line = run_cli(capsys, "--model", str(model), "--out", out, *extra)
        assert (code, want in line) == (want_code, True), line
    for wrong, want in ((root / "data", "is not a model folder: no config.json"),
                        (tmp_path / "nowhere", "no such model folder")):
        code, line = run_cli(capsys, "--model", str(wrong), "--out", out, "--texts", str(tmp_path / "ok.txt"))
        assert code == 2 and want in line, line
    (tmp_path / "file").write_text("x")
    code, line = run_cli(capsys, "--model", str(model), "--out", str(tmp_path / "file"), "--texts", str(tmp_path / "ok.txt"))
    assert code == 2 and "is a file, not a folder" in line
    assert not (tmp_path / "out").exists()  # nothing refused left a folder behind


def test_a_store_of_another_feature_size_is_refused(bench, tmp_path):
    from fixture_writers import write_gallery

    _, model = bench
    write_gallery(tmp_path, num_images=2, feature_dim=FEATURE_DIM + 1, images=False)
    with pytest.raises(UsageError, match=r"holds 17-d region features, but the model .* takes 16-d"):
        embed(model, tmp_path / "out", features=tmp_path / "features", progress=False)


def test_the_command_prints_what_it_wrote(bench, tmp_path, capsys):
    root, model = bench
    (tmp_path / "q.txt").write_text("a red ball\n")
    assert interbert_main(["embed", "--model", str(model), "--out", str(tmp_path / "o"), "--texts", str(tmp_path / "q.txt"),
                           "--features", str(root / "data" / "regions"), "--max-regions", "10", "--chunk-size", "4"]) == 0
    assert capsys.readouterr().out.strip() == (f"{tmp_path / 'o'}: 1 texts, 16 images, 8-d (texts.npy, texts.ids.json, "
                                               f"images.npy, images.ids.json); 5 chunk(s) embedded, 0 already done")
    manifest = json.loads((tmp_path / "o" / "embed.json").read_text())
    assert manifest["work"]["images"]["max_regions"] == 10 and manifest["complete"] is True
    with pytest.raises(DataError, match="holds no images|not a finished"):
        read_embeddings(tmp_path / "nowhere", "images")


def test_an_image_with_nan_features_keeps_its_row_and_is_named(bench, tmp_path, caplog):
    from fixture_writers import write_gallery

    _, model = bench
    ids = write_gallery(tmp_path, num_images=3, feature_dim=FEATURE_DIM, images=False)
    with np.load(tmp_path / "features" / f"{ids[1]}.npz") as saved:
        arrays = dict(saved)
    arrays["features"][0, 0] = np.nan
    np.savez(tmp_path / "features" / f"{ids[1]}.npz", **arrays)
    report = embed(model, tmp_path / "out", features=tmp_path / "features", progress=False)
    got_ids, vectors = read_embeddings(tmp_path / "out", "images")
    assert got_ids == ids and report.non_finite == {"images": [ids[1]]}  # rows stay aligned with the ids
    assert np.isfinite(vectors[[0, 2]]).all() and not np.isfinite(vectors[1]).all()
    assert f"1 images have an embedding with NaN or inf ('{ids[1]}')" in caplog.text
    assert json.loads((tmp_path / "out" / "embed.json").read_text())["non_finite"] == {"images": [ids[1]]}


def test_the_command_offers_the_libraries_text_formats():
    from interbert import embed_cli, embedding

    assert embed_cli.TEXT_FORMATS == embedding.TEXT_FORMATS
