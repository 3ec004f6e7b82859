"""The image index: build, resume after a failure, append, index type choice, model bookkeeping."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sqlite3

import faiss
import numpy as np
import pytest

from conftest import minilm_vocab, shared_path
from interbert.cli import main as interbert_main
from interbert.errors import DataError
from interbert.serve import index as index_module
from interbert.serve.index import ImageIndex, build_index, choose_index_type
from interbert.serve.synthetic_gallery import save_tiny_model
from fixture_writers import write_gallery
from interbert.utils import files
from interbert.utils.files import leftover_temporaries

FEATURE_DIM = 16


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    ids = write_gallery(folder, num_images=10, feature_dim=FEATURE_DIM, seed=1)
    model = save_tiny_model(folder / "model", minilm_vocab(), FEATURE_DIM)
    return folder, model, ids


def stored_embeddings(folder) -> dict[str, np.ndarray]:
    with sqlite3.connect(folder / "meta.sqlite") as db:
        return {i: np.frombuffer(blob, dtype=np.float32) for i, blob in db.execute("SELECT image_id, embedding FROM images")}


def test_build_indexes_every_image_with_metadata_and_model_record(gallery, tmp_path):
    folder, model, ids = gallery
    report = build_index(model, folder / "features", tmp_path / "idx", thumbnails=folder / "images", progress=False)
    assert (report.added, report.total, report.index_type) == (10, 10, "flat")

    index = ImageIndex(tmp_path / "idx")
    assert len(index) == 10
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["model"] == str(model.resolve())
    assert manifest["model_config"]["region_feature_size"] == FEATURE_DIM
    assert len(manifest["weights_sha256"]) == 64
    record = index.record(ids[3])
    assert record.image_id == ids[3] and record.store == str((folder / "features").resolve())
    assert (tmp_path / "idx" / record.thumbnail).is_file()
    # An image's own embedding finds that image first.
    vectors = stored_embeddings(tmp_path / "idx")
    scores, rows = index.search(vectors[ids[3]][None], 3)
    assert index.records(rows[0])[0].image_id == ids[3]
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_a_failed_build_keeps_finished_batches_and_a_rerun_resumes(gallery, tmp_path):
    folder, model, ids = gallery
    features = tmp_path / "features"
    features.mkdir()
    for i in ids:
        (features / f"{i}.npz").write_bytes((folder / "features" / f"{i}.npz").read_bytes())
    broken = features / f"{ids[-1]}.npz"
    np.savez(broken, features=np.zeros((2, FEATURE_DIM), np.float32), image_w=10, image_h=10)  # no boxes

    with pytest.raises(ValueError, match=ids[-1]):
        build_index(model, features, tmp_path / "idx", batch_size=3, progress=False)
    assert len(stored_embeddings(tmp_path / "idx")) == 9  # three committed batches survive the failure

    broken.write_bytes((folder / "features" / f"{ids[-1]}.npz").read_bytes())
    report = build_index(model, features, tmp_path / "idx", batch_size=3, progress=False)
    assert (report.added, report.already_indexed, report.total) == (1, 9, 10)
    assert len(ImageIndex(tmp_path / "idx")) == 10

    fresh = tmp_path / "fresh"
    build_index(model, features, fresh, batch_size=10, progress=False)
    resumed, expected = stored_embeddings(tmp_path / "idx"), stored_embeddings(fresh)
    assert resumed.keys() == expected.keys()
    for image_id in expected:  # padding to another batch's longest image does not change an embedding
        np.testing.assert_allclose(resumed[image_id], expected[image_id], atol=1e-5)


def test_add_appends_images_of_another_store(gallery, tmp_path):
    folder, model, ids = gallery
    build_index(model, folder / "features", tmp_path / "idx", progress=False)
    more = tmp_path / "more"
    new_ids = write_gallery(more, num_images=3, feature_dim=FEATURE_DIM, seed=2, images=False, id_prefix="new")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image_id": i, "caption": f"picture {i}"}) + "\n" for i in new_ids))

    report = build_index(model, more / "features", tmp_path / "idx", captions=captions, append=True, progress=False)
    assert (report.added, report.total) == (3, 13)
    index = ImageIndex(tmp_path / "idx")
    assert len(index) == 13
    assert index.record(new_ids[0]).caption == f"picture {new_ids[0]}"
    assert index.record(new_ids[0]).store == str((more / "features").resolve())
    assert index.record(ids[0]).caption is None


def assert_no_temporaries(folder) -> None:
    assert leftover_temporaries(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "index.json", "meta.sqlite"]


def assert_answers_with(folder, image_ids) -> None:
    """The index folder opens, holds exactly ``image_ids`` and finds each image by its own embedding."""
    index = ImageIndex(folder)
    assert len(index) == len(image_ids)
    vectors = stored_embeddings(folder)
    for image_id in image_ids[:3]:
        _, rows = index.search(vectors[image_id][None], 1)
        assert index.records(rows[0])[0].image_id == image_id
    index.close()


def test_a_faiss_writer_failing_midway_keeps_the_previous_index(gallery, tmp_path, monkeypatch):
    folder, model, ids = gallery
    build_index(model, folder / "features", tmp_path / "idx", index_type="flat", progress=False)
    before = (tmp_path / "idx" / "index.faiss").read_bytes()

    def half_then_full_disk(index, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(index_module.faiss, "write_index", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):  # rebuilding the same folder as another index type
        build_index(model, folder / "features", tmp_path / "idx", index_type="hnsw", progress=False)
    assert_no_temporaries(tmp_path / "idx")
    assert (tmp_path / "idx" / "index.faiss").read_bytes() == before
    assert ImageIndex(tmp_path / "idx").index_type == "flat"
    assert_answers_with(tmp_path / "idx", ids)


@pytest.mark.parametrize("failing_file", ["index.faiss", "index.json"])
def test_a_failed_rename_during_add_keeps_an_index_that_answers_and_a_rerun_completes(
        gallery, tmp_path, monkeypatch, capsys, failing_file):
    folder, model, ids = gallery
    out = tmp_path / "idx"
    build_index(model, folder / "features", out, progress=False)
    new_ids = write_gallery(tmp_path / "more", num_images=3, feature_dim=FEATURE_DIM, seed=2, images=False, id_prefix="new")
    real_replace = os.replace

    def full_disk_for(src, dst):
        if os.path.basename(dst) == failing_file:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", full_disk_for)
    add = ["index", "add", "--index", str(out), "--features", str(tmp_path / "more" / "features")]
    assert interbert_main(add) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert_no_temporaries(out)
    if failing_file == "index.faiss":  # the previous index, exactly
        assert_answers_with(out, ids)
    else:  # the new index.faiss is in place; the manifest is the previous one
        assert_answers_with(out, ids + new_ids)
        assert json.loads((out / "index.json").read_text())["num_images"] == len(ids)

    monkeypatch.setattr(files.os, "replace", real_replace)
    assert interbert_main(add) == 0
    assert "13 images (0 added, 3 already indexed)" in capsys.readouterr().out
    assert json.loads((out / "index.json").read_text())["num_images"] == 13
    assert_answers_with(out, ids + new_ids)


def test_add_needs_an_existing_index(gallery, tmp_path):
    folder, model, _ = gallery
    with pytest.raises(FileNotFoundError, match="build it first"):
        build_index(model, folder / "features", tmp_path / "nothing", append=True, progress=False)


def test_index_type_is_exact_for_small_galleries_and_approximate_above_the_threshold():
    threshold = index_module.FLAT_MAX_IMAGES
    assert choose_index_type(threshold) == "flat"
    assert choose_index_type(threshold + 1) == "hnsw"
    assert choose_index_type(10, "ivf") == "ivf"
    assert choose_index_type(10**7, "flat") == "flat"
    with pytest.raises(ValueError, match="index type"):
        choose_index_type(10, "annoy")


@pytest.mark.parametrize("requested, expected_class", [("hnsw", faiss.IndexHNSW), ("ivf", faiss.IndexIVF)])
def test_approximate_index_types_find_the_same_nearest_image(gallery, tmp_path, requested, expected_class):
    folder, model, ids = gallery
    build_index(model, folder / "features", tmp_path / "idx", index_type=requested, progress=False)
    index = ImageIndex(tmp_path / "idx")
    assert index.index_type == requested
    assert isinstance(faiss.downcast_index(index.faiss.index), expected_class)
    vectors = stored_embeddings(tmp_path / "idx")
    for image_id in ids[:4]:
        _, rows = index.search(vectors[image_id][None], 1)
        assert index.records(rows[0])[0].image_id == image_id


def test_auto_switches_to_hnsw_when_the_gallery_outgrows_flat(gallery, tmp_path, monkeypatch):
    folder, model, _ = gallery
    monkeypatch.setattr(index_module, "FLAT_MAX_IMAGES", 5)
    report = build_index(model, folder / "features", tmp_path / "idx", progress=False)
    assert report.index_type == "hnsw"
    assert ImageIndex(tmp_path / "idx").index_type == "hnsw"


def test_an_index_refuses_embeddings_of_another_model(gallery, tmp_path):
    folder, model, _ = gallery
    build_index(model, folder / "features", tmp_path / "idx", progress=False)
    other = save_tiny_model(tmp_path / "other", minilm_vocab(), FEATURE_DIM, seed=1)
    with pytest.raises(ValueError, match="different weights"):
        build_index(other, folder / "features", tmp_path / "idx", progress=False)


def test_features_of_the_wrong_size_name_the_store(gallery, tmp_path):
    folder, model, _ = gallery
    write_gallery(tmp_path / "wrong", num_images=1, feature_dim=FEATURE_DIM + 1, images=False)
    with pytest.raises(ValueError, match="wrong/features holds 17-d region features.*model takes 16-d"):
        build_index(model, tmp_path / "wrong" / "features", tmp_path / "idx", progress=False)


def test_cli_build_then_add(gallery, tmp_path, capsys):
    folder, model, _ = gallery
    out = tmp_path / "idx"
    assert interbert_main(["index", "build", "--model", str(model), "--features", str(folder / "features"),
                           "--out", str(out), "--thumbnails", str(folder / "images"), "--index-type", "flat",
                           "--batch-size", "4"]) == 0
    assert "10 images (10 added, 0 already indexed), flat index" in capsys.readouterr().out
    more = write_gallery(tmp_path / "more", num_images=2, feature_dim=FEATURE_DIM, seed=3, images=False, id_prefix="x")
    assert interbert_main(["index", "add", "--index", str(out), "--features", str(tmp_path / "more" / "features")]) == 0
    assert "12 images (2 added" in capsys.readouterr().out
    assert ImageIndex(out).record(more[1]) is not None
    # A path that cannot be opened is a message and exit code 2 (the command line must change), not a traceback.
    assert interbert_main(["index", "add", "--index", str(out), "--features", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "run the same command again to resume" in err  # the index it had is kept


def test_cli_build_refused_before_it_starts_says_one_line(gallery, tmp_path, capsys):
    """A build that fails before it has written anything has nothing to resume: one error line, no hint."""
    folder, _, _ = gallery
    assert interbert_main(["index", "build", "--model", str(tmp_path / "no_model"), "--features",
                           str(folder / "features"), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no_model" in err[0]


def test_real_detector_features_captions_and_images(tmp_path):
    regions = shared_path("data", "regions")
    model = save_tiny_model(tmp_path / "model", minilm_vocab(), 1024)  # these features are 1024-d
    report = build_index(model, regions / "features_npz", tmp_path / "idx", progress=False,
                         captions=regions / "DERIVED_flickr30k_captions_for_fixture_images.json",
                         thumbnails=regions / "images")
    assert report.total == 12
    assert report.without_thumbnail == 11  # one image has both detector features and a photo here
    assert report.captions_for_unknown_images == 3  # captions of photos without features: counted, not hidden
    index = ImageIndex(tmp_path / "idx")
    record = index.record("1016887272")
    assert record.caption and record.caption[0].isupper()
    assert (tmp_path / "idx" / record.thumbnail).stat().st_size > 1000


def test_demo_path_indexes_the_test_split_of_the_built_in_benchmark(tmp_path, capsys):
    """What `make demo` ends with: an index over the generated benchmark's test images."""
    from interbert.synthetic import generate

    manifest = generate(tmp_path / "data", images=12, val_images=2, test_images=4, lang="en", seed=0, feature_dim=16,
                        fmt="store")  # as the demo writes it
    data = tmp_path / "data"
    model = save_tiny_model(tmp_path / "model", minilm_vocab(), 16)
    assert interbert_main(["index", "build", "--model", str(model), "--features", str(data / manifest["files"]["regions"]),
                           "--captions", str(data / "captions.json"), "--split", "test",
                           "--thumbnails", str(data / "images"), "--max-regions", "24", "--out", str(tmp_path / "index")]) == 0
    assert "4 images (4 added" in capsys.readouterr().out
    index = ImageIndex(tmp_path / "index")
    records = index.records(range(1, 5))
    assert all(r.caption and r.thumbnail for r in records)
    assert interbert_main(["index", "build", "--model", str(model), "--features", str(data / manifest["files"]["regions"]),
                           "--split", "test", "--out", str(tmp_path / "other")]) == 1
    assert "needs the captions file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Image ids are data: they never lead the build outside the thumbnail folder
# --------------------------------------------------------------------------------------------------
def tsv_store(path, ids, seed=0):
    """A TSV feature store whose image ids may be anything (an npz folder's ids are file names)."""
    from interbert.data.features import write_tsv
    from interbert.serve.synthetic_gallery import generated_regions

    regions = [r for _, r in generated_regions(len(ids), FEATURE_DIM, seed=seed)]
    write_tsv(path, zip(ids, regions))
    return path


@pytest.fixture
def thumbnails_beside_a_secret(tmp_path):
    from PIL import Image

    (tmp_path / "outside").mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "outside" / "private.jpg")
    (tmp_path / "thumbs").mkdir()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "thumbs" / "fine.jpg")
    return tmp_path / "thumbs", tmp_path / "outside" / "private"


@pytest.mark.parametrize("kind", ["relative", "absolute", "symlink"])
def test_ids_that_lead_out_of_the_thumbnail_folder_are_refused(gallery, tmp_path, thumbnails_beside_a_secret, kind):
    _, model, _ = gallery
    thumbs, secret = thumbnails_beside_a_secret
    if kind == "relative":
        bad_id, message = "../outside/private", "points outside the thumbnail folder"
    elif kind == "absolute":
        bad_id, message = str(secret), "points outside the thumbnail folder"
    else:
        bad_id, message = "innocent", "is a link to .*private.jpg, outside the thumbnail folder"
        (thumbs / "innocent.jpg").symlink_to(secret.with_suffix(".jpg"))
    store = tsv_store(tmp_path / "features.tsv", ["fine", bad_id])

    with pytest.raises(DataError, match=f"image id {re.escape(repr(bad_id))}.*{message}"):
        build_index(model, store, tmp_path / "idx", thumbnails=thumbs, progress=False)
    assert not (tmp_path / "idx").exists()  # refused before any work: the new folder is not left behind


def test_the_cli_names_a_traversal_id_on_one_line(gallery, tmp_path, thumbnails_beside_a_secret, capsys):
    _, model, _ = gallery
    thumbs, _ = thumbnails_beside_a_secret
    store = tsv_store(tmp_path / "features.tsv", ["fine", "../outside/private"])
    assert interbert_main(["index", "build", "--model", str(model), "--features", str(store), "--out",
                           str(tmp_path / "idx"), "--thumbnails", str(thumbs)]) == 1
    err = capsys.readouterr().err
    (error,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert error.startswith("error: image id '../outside/private' points outside the thumbnail folder")
    assert "Traceback" not in err


def test_ids_in_subfolders_and_links_within_the_folder_are_followed(gallery, tmp_path, thumbnails_beside_a_secret):
    _, model, _ = gallery
    thumbs, _ = thumbnails_beside_a_secret
    (thumbs / "2014").mkdir()
    (thumbs / "fine.jpg").rename(thumbs / "2014" / "fine.jpg")
    (thumbs / "alias.jpg").symlink_to(thumbs / "2014" / "fine.jpg")
    store = tsv_store(tmp_path / "features.tsv", ["2014/fine", "alias", "a/..", "no-image"])
    report = build_index(model, store, tmp_path / "idx", thumbnails=thumbs, progress=False)
    assert (report.total, report.without_thumbnail) == (4, 2)
    index = ImageIndex(tmp_path / "idx")
    assert index.record("2014/fine").thumbnail and index.record("alias").thumbnail
    assert index.record("a/..").thumbnail is None


# --------------------------------------------------------------------------------------------------
# Images with non-finite embeddings are counted, named and left out (FAISS would drop them silently)
# --------------------------------------------------------------------------------------------------
def copy_with_nan(folder, ids, target, nan_ids):
    target.mkdir()
    for i in ids:
        regions = dict(np.load(folder / "features" / f"{i}.npz"))
        if i in nan_ids:
            regions["features"][0, 3] = np.nan
        np.savez(target / f"{i}.npz", **regions)
    return target


def test_an_image_with_nan_features_is_named_and_left_out_and_the_others_are_indexed(gallery, tmp_path, caplog):
    folder, model, ids = gallery
    features = copy_with_nan(folder, ids, tmp_path / "features", {ids[4]})
    with caplog.at_level("WARNING"):
        report = build_index(model, features, tmp_path / "idx", batch_size=4, progress=False)
    assert (report.added, report.total, report.non_finite) == (9, 9, (ids[4],))
    assert "1 images not indexed, their embeddings hold NaN or inf" in caplog.text and repr(ids[4]) in caplog.text
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["not_indexed_non_finite"] == {str(features.resolve()): {"count": 1, "image_ids": [ids[4]]}}
    others = [i for i in ids if i != ids[4]]
    assert_answers_with(tmp_path / "idx", others)
    assert ImageIndex(tmp_path / "idx").record(ids[4]) is None

    # Fixed features: the rerun indexes the image and the manifest no longer lists it.
    np.savez(features / f"{ids[4]}.npz", **dict(np.load(folder / "features" / f"{ids[4]}.npz")))
    report = build_index(model, features, tmp_path / "idx", progress=False)
    assert (report.added, report.total, report.non_finite) == (1, 10, ())
    assert "not_indexed_non_finite" not in json.loads((tmp_path / "idx" / "index.json").read_text())


def test_index_add_reports_non_finite_images_of_the_added_store(gallery, tmp_path, capsys):
    folder, model, ids = gallery
    build_index(model, folder / "features", tmp_path / "idx", progress=False)
    more = tmp_path / "more"
    new_ids = write_gallery(more, num_images=4, feature_dim=FEATURE_DIM, seed=2, images=False, id_prefix="new")
    nan_store = copy_with_nan(more, new_ids, tmp_path / "nan", {new_ids[0]})
    assert interbert_main(["index", "add", "--index", str(tmp_path / "idx"), "--features", str(nan_store)]) == 0
    assert "13 images (3 added, 0 already indexed, 1 left out (non-finite embeddings" in capsys.readouterr().out
    left_out = json.loads((tmp_path / "idx" / "index.json").read_text())["not_indexed_non_finite"]
    assert left_out == {str(nan_store.resolve()): {"count": 1, "image_ids": [new_ids[0]]}}
    assert_answers_with(tmp_path / "idx", ids + new_ids[1:])


def test_mostly_non_finite_embeddings_fail_the_build(gallery, tmp_path, capsys):
    folder, model, ids = gallery
    features = copy_with_nan(folder, ids, tmp_path / "features", set(ids[:6]))
    assert interbert_main(["index", "build", "--model", str(model), "--features", str(features), "--out",
                           str(tmp_path / "idx")]) == 1
    error = capsys.readouterr().err
    assert f"error: {features}: 6 of 10 images have embeddings with NaN or inf ({ids[0]!r}," in error
    assert "and 1 more" in error


# --------------------------------------------------------------------------------------------------
# A failed build leaves the folder as it was; a store is recorded only with its first image
# --------------------------------------------------------------------------------------------------
def folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]  # the loader's bar
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def truncated_tsv(path, ids, keep_fields: bool):
    """A TSV store cut short: inside the last field of its first line (the line still has every field,
    its features do not decode) or before the first tab (the line is one field short)."""
    full = tsv_store(path, ids).read_bytes()
    first_line = full.split(b"\n", 1)[0]
    cut = len(first_line) - 20 if keep_fields else first_line.index(b"\t") + 1
    path.write_bytes(full[:cut])
    return path


@pytest.mark.parametrize("keep_fields", [True, False])
def test_a_truncated_store_is_one_line_and_no_new_folder(gallery, tmp_path, capsys, keep_fields):
    _, model, _ = gallery
    store = truncated_tsv(tmp_path / "cut.tsv", ["a", "b"], keep_fields)
    out = tmp_path / "new" / "idx"
    code = interbert_main(["index", "build", "--model", str(model), "--features", str(store), "--out", str(out)])
    error = one_error_line(capsys)
    assert code == 1 and "cut.tsv" in error
    assert not (tmp_path / "new").exists()  # not created, not even its parent


@pytest.mark.parametrize("keep_fields", [True, False])
def test_a_truncated_store_into_an_existing_index_leaves_it_byte_identical(gallery, tmp_path, capsys, keep_fields):
    folder, model, _ = gallery
    out = tmp_path / "idx"
    build_index(model, folder / "features", out, thumbnails=folder / "images", progress=False)
    before = folder_bytes(out)
    store = truncated_tsv(tmp_path / "cut.tsv", ["a", "b"], keep_fields)
    code = interbert_main(["index", "add", "--index", str(out), "--features", str(store),
                           "--thumbnails", str(folder / "images")])
    err = capsys.readouterr().err
    assert code == 1 and "error: " in err and "cut.tsv" in err and "Traceback" not in err
    assert folder_bytes(out) == before


def test_a_store_with_nothing_new_is_not_recorded_and_serve_starts_without_it(gallery, tmp_path, capsys):
    from interbert.serve.service import create_app

    folder, model, ids = gallery
    out = tmp_path / "idx"
    build_index(model, folder / "features", out, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(folder / "features", copy)  # the same images under another path: all already indexed
    assert interbert_main(["index", "add", "--index", str(out), "--features", str(copy)]) == 0
    assert "(0 added, 10 already indexed)" in capsys.readouterr().out
    with sqlite3.connect(out / "meta.sqlite") as db:
        assert [p for (p,) in db.execute("SELECT path FROM stores")] == [str((folder / "features").resolve())]
    assert json.loads((out / "index.json").read_text())["feature_stores"] == [str((folder / "features").resolve())]
    shutil.rmtree(copy)  # moving a store that holds none of the index's images does not stop serve
    assert len(create_app(out, model).state.service.index) == 10


def test_an_empty_store_is_an_error_naming_it(gallery, tmp_path, capsys):
    _, model, _ = gallery
    (tmp_path / "empty").mkdir()  # an npz folder without a single image
    code = interbert_main(["index", "build", "--model", str(model), "--features", str(tmp_path / "empty"),
                           "--out", str(tmp_path / "idx")])
    error = one_error_line(capsys)
    assert code == 1 and "empty" in error and not (tmp_path / "idx").exists()


def test_out_that_is_a_file_is_one_line_and_the_file_is_unchanged(gallery, tmp_path, capsys):
    folder, model, _ = gallery
    out = tmp_path / "idx"
    out.write_bytes(b"not an index")
    code = interbert_main(["index", "build", "--model", str(model), "--features", str(folder / "features"),
                           "--out", str(out)])
    error = one_error_line(capsys)
    assert code == 2 and str(out) in error and "is a file" in error
    assert out.read_bytes() == b"not an index"


def test_temporaries_of_a_killed_build_are_removed_at_the_next_start(gallery, tmp_path):
    folder, model, _ = gallery
    out = tmp_path / "idx"
    build_index(model, folder / "features", out, progress=False)
    dead = os.fork()  # a writer that is gone: its pid is in the temporary's name
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    killed = [out / f".index.json.tmp-{dead}-1", out / f".index.faiss.tmp-{dead}-7"]
    live = out / f".index.faiss.tmp-{os.getppid()}-1"  # a writer still running (the test's parent): kept
    for path in (*killed, live):
        path.write_bytes(b"half a file")
    build_index(model, folder / "features", out, progress=False)
    assert leftover_temporaries(out) == [live]
