"""Hostile index folders and hostile queries: the service trusts no path an index folder names (thumbnails,
model, feature stores, engine), counts a query's length in characters, and refuses a query with nothing
visible in it. Every refusal is one `error:` line at start (or a 4xx answer) and leaves the folder as it was."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import minilm_vocab
from interbert.cli import main as interbert_main
from interbert.errors import DataError, UsageError
from interbert.serve.abtest import ArmSpec
from interbert.serve.experiment import create_experiment_app
from interbert.serve.index import build_index
from interbert.serve.service import create_app
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery

FEATURE_DIM = 16
SECRET = b"root:x:0:0:the secret a crafted folder must not reach\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    ids = write_gallery(folder, num_images=4, feature_dim=FEATURE_DIM, seed=3)
    model = save_tiny_model(folder / "model", minilm_vocab(), FEATURE_DIM, architecture="retrieval")
    build_index(model, folder / "features", folder / "index", thumbnails=folder / "images", progress=False)
    return folder, model, ids


@pytest.fixture
def index(built, tmp_path):
    """A fresh copy of the built index folder, and a secret file beside it (outside the folder)."""
    folder, _, _ = built
    copy = tmp_path / "index"
    shutil.copytree(folder / "index", copy)
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def set_thumbnail(index: Path, row: int, thumbnail) -> str:
    with sqlite3.connect(index / "meta.sqlite") as db:
        db.execute("UPDATE images SET thumbnail = ? WHERE row = ?", (thumbnail, row))
        return db.execute("SELECT image_id FROM images WHERE row = ?", (row,)).fetchone()[0]


def thumbnail_of(index: Path, row: int) -> str:
    with sqlite3.connect(index / "meta.sqlite") as db:
        return db.execute("SELECT thumbnail FROM images WHERE row = ?", (row,)).fetchone()[0]


def edit_manifest(index: Path, **changes) -> None:
    manifest = json.loads((index / "index.json").read_text())
    manifest.update(changes)
    (index / "index.json").write_text(json.dumps(manifest))


def serve_fails(index: Path, capsys, *extra: str) -> tuple[int, str]:
    """`interbert serve --index INDEX` in-process: (exit code, the one error line); the folder is unchanged."""
    before = snapshot(index)
    code = interbert_main(["serve", "--index", str(index), *extra])
    err = capsys.readouterr().err.strip()
    assert snapshot(index) == before
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return code, err


# --------------------------------------------------------------------------------------------------
# Thumbnails: only files of the folder's thumbnails/
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("crafted", ["/etc/passwd", "../../../../etc/hostname", "thumbnails/../../secret.txt",
                                     "thumbnails/../index.json", "meta.sqlite", "thumbnails/..", "thumbnails/"])
def test_a_thumbnail_path_outside_thumbnails_is_refused_at_start_naming_the_row(index, capsys, crafted):
    image_id = set_thumbnail(index, 2, crafted)
    with pytest.raises(DataError, match=f"row 2 \\(image '{image_id}'\\)"):
        create_app(index)
    code, err = serve_fails(index, capsys)
    assert code == 1 and "row 2" in err and image_id in err and "meta.sqlite" in err


def test_a_thumbnail_linking_outside_is_refused_at_start(index, capsys):
    thumbnail = thumbnail_of(index, 3)
    (index / thumbnail).unlink()
    (index / thumbnail).symlink_to(index.parent / "secret.txt")
    code, err = serve_fails(index, capsys)
    assert code == 1 and "row 3" in err and "is a link to" in err and "secret.txt" in err


def test_a_thumbnails_folder_linking_outside_is_refused_at_start(index, capsys):
    outside = index.parent / "elsewhere"
    shutil.move(index / "thumbnails", outside)
    (outside / Path(thumbnail_of(index, 1)).name).write_bytes(SECRET)
    (index / "thumbnails").symlink_to(outside)
    code, err = serve_fails(index, capsys)
    assert code == 1 and "outside the index folder" in err and "thumbnails" in err


def test_a_thumbnail_swapped_for_a_link_after_start_is_not_served(built, index):
    _, _, ids = built
    client = TestClient(create_app(index))
    record = client.app.state.service.index.record(ids[0])
    assert client.get(f"/images/{ids[0]}").status_code == 200
    (index / record.thumbnail).unlink()
    (index / record.thumbnail).symlink_to(index.parent / "secret.txt")
    response = client.get(f"/images/{ids[0]}")
    assert response.status_code == 404 and SECRET not in response.content


def test_links_inside_thumbnails_are_followed(built, index):
    _, _, ids = built
    first, second = thumbnail_of(index, 1), thumbnail_of(index, 2)
    (index / second).unlink()
    (index / second).symlink_to(Path(first).name)  # relative link to a sibling thumbnail
    client = TestClient(create_app(index))
    assert client.get(f"/images/{ids[1]}").content == (index / first).read_bytes()


def test_the_ab_service_serves_thumbnails_through_the_same_confinement(built, index, tmp_path):
    _, _, ids = built
    other = tmp_path / "other_index"
    shutil.copytree(index, other)
    app = create_experiment_app([ArmSpec("control", index), ArmSpec("treatment", other)], [0.5, 0.5], "exp",
                                tmp_path / "events.sqlite")
    with TestClient(app) as client:
        assert client.get(f"/images/{ids[0]}").status_code == 200
        for folder in (index, other):  # both arms' copies swapped after start: neither is followed
            thumbnail = folder / thumbnail_of(folder, 1)
            thumbnail.unlink()
            thumbnail.symlink_to(tmp_path / "secret.txt")
        response = client.get(f"/images/{ids[0]}")
        assert response.status_code == 404 and SECRET not in response.content
    set_thumbnail(other, 1, "/etc/passwd")
    with pytest.raises(DataError, match="row 1"):
        create_experiment_app([ArmSpec("control", index), ArmSpec("treatment", other)], [0.5, 0.5], "exp",
                              tmp_path / "events2.sqlite")


# --------------------------------------------------------------------------------------------------
# index.json and the stores table: model, feature stores, engine
# --------------------------------------------------------------------------------------------------
def test_a_relative_model_path_leading_outside_the_folder_is_refused(built, index, capsys):
    _, model, _ = built
    relative = os.path.relpath(model, index)  # a real model, but reached through ".."
    edit_manifest(index, model=relative)
    code, err = serve_fails(index, capsys)
    assert code == 1 and "index.json" in err and "model path" in err and "outside the index folder" in err
    # --model on the command line is the user's word: it is taken as given.
    assert create_app(index, model).state.service.model.model_dir == model


def test_a_relative_model_path_inside_the_folder_is_read_there(built, index, tmp_path, monkeypatch):
    _, model, _ = built
    shutil.copytree(model, index / "model")
    edit_manifest(index, model="model")
    monkeypatch.chdir(tmp_path)  # not the working directory's ./model
    assert create_app(index).state.service.model.model_dir == (index / "model").resolve()


@pytest.mark.parametrize("crafted", [123, "", None])
def test_a_model_path_that_is_not_a_path_is_one_line(index, capsys, crafted):
    edit_manifest(index, model=crafted)
    code, err = serve_fails(index, capsys)
    assert code == 1 and "index.json" in err and ("model path must be" in err or "model must be a string" in err)


def test_a_feature_store_path_leading_outside_the_folder_is_refused(built, index, capsys):
    folder, _, _ = built
    with sqlite3.connect(index / "meta.sqlite") as db:
        db.execute("UPDATE stores SET path = ?", (os.path.relpath(folder / "features", index),))
    code, err = serve_fails(index, capsys)
    assert code == 1 and "meta.sqlite" in err and "feature store path" in err and "outside" in err


def test_a_folder_naming_a_milvus_server_is_refused_without_engine_on_the_command_line(index, capsys):
    edit_manifest(index, engine="milvus://collector.example:19530/stolen")
    with pytest.raises(UsageError, match="--engine milvus://collector.example:19530/stolen"):
        create_app(index)
    code, err = serve_fails(index, capsys)
    assert code == 2 and "pass --engine milvus://collector.example:19530/stolen explicitly" in err
    assert "MILVUS_TOKEN" in err


def test_a_milvus_server_the_environment_names_is_taken_from_the_folder(index, monkeypatch):
    from interbert.serve.index import ImageIndex, trusted_engine

    uri = "milvus://milvus.internal:19530/catalogue"
    edit_manifest(index, engine=uri)
    monkeypatch.setenv("INTERBERT_MILVUS_SERVERS", f"milvus://other:19530/x, {uri}")
    assert trusted_engine(index, None, uri).uri == uri  # accepted: what the operator listed
    monkeypatch.setenv("INTERBERT_MILVUS_SERVERS", "milvus://other:19530/x")
    with pytest.raises(UsageError, match="INTERBERT_MILVUS_SERVERS"):
        ImageIndex(index)


def test_index_add_on_a_folder_naming_a_milvus_server_is_refused(built, index, capsys):
    folder, model, _ = built
    edit_manifest(index, engine="milvus://collector.example:19530/stolen")
    before = snapshot(index)
    code = interbert_main(["index", "add", "--index", str(index), "--features", str(folder / "features")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "pass --engine" in err and len(err.splitlines()) == 1
    assert snapshot(index) == before


def test_a_milvus_lite_file_leading_outside_the_folder_is_refused(index, capsys):
    edit_manifest(index, engine="milvus:../../somewhere/else.db")
    code, err = serve_fails(index, capsys)
    assert code == 1 and "milvus-lite file path" in err and "outside the index folder" in err


def test_a_damaged_manifest_is_one_line_naming_it(index, capsys):
    (index / "index.json").write_text('{"model": ')
    code, err = serve_fails(index, capsys)
    assert code == 1 and "index.json" in err and "not an index manifest" in err
    (index / "index.json").write_text(json.dumps({"model": "m", "weights_sha256": "x", "embedding_dim": "64"}))
    code, err = serve_fails(index, capsys)
    assert code == 1 and "embedding_dim must be an integer" in err
    (index / "index.json").write_text(json.dumps({"index_type": "flat"}))
    code, err = serve_fails(index, capsys)
    assert code == 1 and "lacks model, weights_sha256, embedding_dim, max_regions" in err


# --------------------------------------------------------------------------------------------------
# topics build --out: a folder, another file, another database
# --------------------------------------------------------------------------------------------------
def topics_build(built, tmp_path, out: Path) -> list[str]:
    folder, _, _ = built
    topics = tmp_path / "topics.txt"
    topics.write_text("a red ball\na blue cube\n")
    return ["topics", "build", "--topics", str(topics), "--index", str(folder / "index"), "--out", str(out),
            "--top", "2", "--no-progress"]


def refused(argv: list[str], watched: Path, capsys) -> tuple[int, str]:
    before = snapshot(watched) if watched.is_dir() else watched.read_bytes()
    code = interbert_main(argv)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert (snapshot(watched) if watched.is_dir() else watched.read_bytes()) == before
    return code, lines[0]


def test_topics_build_out_a_folder_is_one_line(built, tmp_path, capsys):
    out = tmp_path / "feeds"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    code, error = refused(topics_build(built, tmp_path, out), out, capsys)
    assert code == 2 and str(out) in error and "is a folder" in error


def test_topics_build_out_a_file_of_another_kind_is_one_line(built, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("not a feed\n")
    code, error = refused(topics_build(built, tmp_path, out), out, capsys)
    assert code == 2 and str(out) in error and "not SQLite" in error


def test_topics_build_out_another_database_is_one_line_and_untouched(built, tmp_path, capsys):
    out = tmp_path / "events.sqlite"
    with sqlite3.connect(out) as db:
        db.execute("CREATE TABLE impressions (request_id TEXT)")
    code, error = refused(topics_build(built, tmp_path, out), out, capsys)
    assert code == 2 and "another SQLite database" in error and "impressions" in error


def test_topics_build_out_under_a_file_is_one_line(built, tmp_path, capsys):
    blocker = tmp_path / "plain"
    blocker.write_text("a file where a folder would be")
    code, error = refused(topics_build(built, tmp_path, blocker / "feed.sqlite"), blocker, capsys)
    assert code == 2 and "is a file, not a folder" in error


def test_topics_build_into_a_new_file_and_again_is_fine(built, tmp_path, capsys):
    out = tmp_path / "new" / "feed.sqlite"
    assert interbert_main(topics_build(built, tmp_path, out)) == 0
    assert "2 topics (2 built, 0 already done)" in capsys.readouterr().out
    assert interbert_main(topics_build(built, tmp_path, out)) == 0  # its own feed: continued, not refused
    assert "(0 built, 2 already done)" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"not a database at all", b""])
def test_a_meta_sqlite_that_is_not_the_index_database_is_one_line(index, capsys, content):
    (index / "meta.sqlite").write_bytes(content)  # empty: SQLite opens it, but it has no images table
    code, err = serve_fails(index, capsys)
    assert code == 1 and "meta.sqlite: not an index database" in err
