"""Relocatable index folders: built with --copy-model and --copy-features, a folder names only what it holds
(by relative paths, read inside it as issue #23 requires), so it can be moved or copied elsewhere and serves
the same answers there, with the originals gone."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
from fastapi.testclient import TestClient

from conftest import minilm_vocab
from interbert.cli import main as interbert_main
from interbert.errors import UsageError
from interbert.serve import index as index_module
from interbert.serve.index import build_index
from interbert.serve.service import SearchService, create_app
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery

FEATURE_DIM = 16
QUERIES = ["a red ball", "two blue cubes left of a sphere", "green"]


@pytest.fixture
def sources(tmp_path):
    ids = write_gallery(tmp_path / "gallery", num_images=9, feature_dim=FEATURE_DIM, seed=4)
    model = save_tiny_model(tmp_path / "model", minilm_vocab(), FEATURE_DIM)
    return tmp_path, model, ids


def answers(index) -> list:
    service = SearchService(index)
    return [[(h.image_id, round(h.score, 5)) for h in service.search(q, 5, rerank).results]
            for q in QUERIES for rerank in (False, True)]


def stores_of(index) -> list[str]:
    with sqlite3.connect(index / "meta.sqlite") as db:
        return [r[0] for r in db.execute("SELECT path FROM stores ORDER BY store_id")]


def test_a_folder_built_with_copies_serves_the_same_answers_after_a_move_with_the_originals_gone(sources, capsys):
    root, model, ids = sources
    plain, copied = root / "plain", root / "copied"
    build_index(model, root / "gallery" / "features", plain, thumbnails=root / "gallery" / "images", progress=False)
    assert interbert_main(["index", "build", "--model", str(model), "--features", str(root / "gallery" / "features"),
                           "--thumbnails", str(root / "gallery" / "images"), "--out", str(copied),
                           "--copy-model", "--copy-features"]) == 0
    capsys.readouterr()
    assert json.loads((copied / "index.json").read_text())["model"] == "model"
    assert stores_of(copied) == ["features/features"]
    want = answers(plain)

    moved = root / "elsewhere" / "deeper" / "index"
    moved.parent.mkdir(parents=True)
    shutil.move(copied, moved)
    shutil.move(model, root / "model.gone")  # nothing outside the folder is read any more
    shutil.move(root / "gallery", root / "gallery.gone")
    assert answers(moved) == want
    client = TestClient(create_app(moved))
    assert client.get(f"/images/{ids[0]}").status_code == 200
    assert client.get("/health").json()["model"] == str((moved / "model").resolve())

    # and it stays an index folder: another store is added to it, copied in beside the first (same name)
    write_gallery(root / "more", num_images=3, feature_dim=FEATURE_DIM, seed=5, images=False, id_prefix="more")
    assert interbert_main(["index", "add", "--index", str(moved), "--features", str(root / "more" / "features"),
                           "--copy-features"]) == 0
    assert "12 images (3 added" in capsys.readouterr().out
    assert stores_of(moved) == ["features/features", "features/features-2"]
    shutil.copytree(moved, root / "copy")  # a copy of it is as good as the original
    assert answers(root / "copy") == answers(moved)


def test_a_model_and_store_already_inside_the_folder_are_recorded_relative_without_copying(sources):
    root, model, _ = sources
    out = root / "index"
    shutil.copytree(model, out / "weights" / "m1")
    shutil.copytree(root / "gallery" / "features", out / "regions")
    build_index(out / "weights" / "m1", out / "regions", out, progress=False)
    assert json.loads((out / "index.json").read_text())["model"] == "weights/m1"
    assert stores_of(out) == ["regions"]
    assert not (out / "model").exists() and not (out / "features").exists()
    want = answers(out)
    shutil.move(out, root / "moved")
    assert answers(root / "moved") == want


def test_without_copies_the_folder_records_absolute_paths_as_before(sources):
    root, model, _ = sources
    build_index(model, root / "gallery" / "features", root / "index", progress=False)
    assert json.loads((root / "index" / "index.json").read_text())["model"] == str(model.resolve())
    assert stores_of(root / "index") == [str((root / "gallery" / "features").resolve())]


def test_resuming_with_copy_model_keeps_the_copy_and_refuses_another_model_there(sources):
    root, model, _ = sources
    out = root / "index"
    build_index(model, root / "gallery" / "features", out, copy_model=True, progress=False)
    before = (out / "model" / "model.safetensors").stat().st_mtime_ns
    build_index(model, root / "gallery" / "features", out, copy_model=True, progress=False)  # nothing new to do
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == before
    other = save_tiny_model(root / "other", minilm_vocab(), FEATURE_DIM, seed=1)
    with pytest.raises(UsageError, match="already holds another model"):
        index_module.copy_model_into(out, other)


def test_a_copy_that_fails_leaves_no_folder_behind(sources, monkeypatch):
    root, model, _ = sources

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_module, "copy_features_into", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_index(model, root / "gallery" / "features", root / "new" / "index", copy_model=True,
                    copy_features=True, progress=False)
    assert not (root / "new").exists()  # the model copied before the failure went with the folder
    (root / "kept").mkdir()
    with pytest.raises(OSError, match="No space left"):
        build_index(model, root / "gallery" / "features", root / "kept", copy_model=True, copy_features=True,
                    progress=False)
    assert list((root / "kept").iterdir()) == []  # a folder the user made stays, as it was


def test_the_ab_event_log_binds_an_arm_to_the_model_inside_its_folder(sources, tmp_path, monkeypatch):
    from interbert.serve.abtest import ArmSpec
    from interbert.serve.experiment import arm_hashes

    root, model, _ = sources
    build_index(model, root / "gallery" / "features", root / "index", copy_model=True, progress=False)
    monkeypatch.chdir(tmp_path)  # not the working directory's ./model
    assert arm_hashes(ArmSpec("control", root / "index")).model == str((root / "index" / "model").resolve())


def test_a_copied_folder_whose_model_became_a_link_outside_is_refused(sources, capsys):
    root, model, _ = sources
    out = root / "index"
    build_index(model, root / "gallery" / "features", out, copy_model=True, copy_features=True, progress=False)
    shutil.rmtree(out / "model")
    (out / "model").symlink_to(model)  # the same weights, but outside the folder: #23's rule holds
    capsys.readouterr()
    assert interbert_main(["serve", "--index", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model path 'model' leads outside the index folder" in err
