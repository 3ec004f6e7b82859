"""``interbert extract`` end to end on real images, with a seeded random-init detector.

Needs torchvision: run with ``make test-extract`` (its own .venv-extract); skipped in the main .venv.
Images are resized small (min_size 192) and the RPN keeps 100 proposals, to keep the file fast.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import shared_path

pytest.importorskip(
    "torchvision", reason="interbert extract needs torchvision: run `make test-extract` (uses .venv-extract)"
)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from interbert.cli import main  # noqa: E402
from interbert.data.features import open_features  # noqa: E402
from interbert.extract.detector import DetectorConfig, build_detector, region_count  # noqa: E402
from interbert.utils.files import file_sha256  # noqa: E402
from interbert.extract.run import extract_features  # noqa: E402

SMALL = {"min_size": 192, "max_size": 256, "num_proposals": 100}
SMALL_FLAGS = ["--min-size", "192", "--max-size", "256", "--num-proposals", "100", "--no-progress"]
REGION_IMAGES = ["1016887272.jpg", "101958970.jpg"]


def small_config(**overrides) -> DetectorConfig:
    return DetectorConfig(**{"weights": "random", "seed": 0, **SMALL, **overrides})


def link_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(shared_path("data", "regions", "images", name))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two real Flickr30k images and a file that only claims to be a JPEG."""
    folder = link_images(tmp_path_factory.mktemp("images"), REGION_IMAGES)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated before any image data")
    return folder


@pytest.fixture(scope="module")
def extracted(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    report = extract_features(images, out, small_config(), batch_size=2, progress=False)
    return out, report


def arrays(store, image_id):
    regions = store[image_id]
    return regions.features, regions.boxes, regions.class_probs


def test_region_count_takes_all_passing_topped_up_to_min_and_capped_at_max():
    assert region_count(num_passing=20, num_candidates=300, min_regions=10, max_regions=36) == 20
    assert region_count(num_passing=3, num_candidates=300, min_regions=10, max_regions=36) == 10
    assert region_count(num_passing=90, num_candidates=300, min_regions=10, max_regions=36) == 36
    assert region_count(num_passing=0, num_candidates=4, min_regions=10, max_regions=36) == 4


def test_detected_regions_are_bounded_inside_the_image_and_1024_wide(extracted):
    out, report = extracted
    store = open_features(out)
    assert sorted(store.ids()) == ["1016887272", "101958970"]
    for image_id in store.ids():
        regions = store[image_id]
        with Image.open(shared_path("data", "regions", "images", f"{image_id}.jpg")) as image:
            assert (regions.image_w, regions.image_h) == image.size
        assert 10 <= regions.num_regions <= 36
        assert regions.features.shape == (regions.num_regions, 1024)
        boxes = regions.boxes
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= regions.image_w).all() and (boxes[:, 3] <= regions.image_h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert regions.class_probs.shape == (regions.num_regions, 91)
        np.testing.assert_allclose(regions.class_probs.sum(1), 1.0, rtol=1e-5)
    assert report.extracted == 2 and report.fewer_than_min_regions == []


def test_extracted_store_passes_data_check_with_the_images_captions(extracted):
    from interbert.data.captions import read_captions
    from interbert.data.check import check_data

    captions = read_captions(shared_path("data", "regions", "DERIVED_flickr30k_captions_for_fixture_images.json"))
    report = check_data(captions, open_features(extracted[0]))
    assert report.errors == [] and report.images_with_boxes_outside == []
    assert sorted(report.caption_image_ids_with_features) == ["1016887272", "101958970"]
    assert report.feature_dim == 1024


def test_undecodable_image_is_named_in_the_report_and_counted(extracted):
    out, report = extracted
    assert report.num_failed == 1 and report.failed[0]["file"].endswith("broken.jpg")
    written = json.loads((out / "extract_report.json").read_text())
    assert written["num_failed"] == 1 and written["failed"][0]["image_id"] == "broken"
    assert "broken" not in open_features(out)
    meta = json.loads((out / "extract_meta.json").read_text())
    assert meta["random_weights"] is True


def test_same_run_twice_gives_identical_arrays(images, extracted, tmp_path):
    first = open_features(extracted[0])
    extract_features(images, tmp_path / "again", small_config(), batch_size=2, progress=False)
    second = open_features(tmp_path / "again")
    for image_id in first.ids():
        for a, b in zip(arrays(first, image_id), arrays(second, image_id)):
            np.testing.assert_array_equal(a, b)


def test_restart_skips_ids_already_in_the_store(images, extracted, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(extracted[0], out)
    before = open_features(out)
    kept = {image_id: arrays(before, image_id) for image_id in before.ids()}
    more = link_images(tmp_path / "more", REGION_IMAGES + ["7162685234.jpg"])
    report = extract_features(more, out, small_config(), batch_size=2, progress=False)
    assert (report.already_done, report.extracted) == (2, 1)
    after = open_features(out)
    assert sorted(after.ids()) == ["1016887272", "101958970", "7162685234"]
    for image_id, old in kept.items():
        for a, b in zip(old, arrays(after, image_id)):
            np.testing.assert_array_equal(a, b)


def test_restart_with_other_settings_is_refused(images, extracted, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(extracted[0], out)
    with pytest.raises(ValueError, match="score_threshold"):
        extract_features(images, out, small_config(score_threshold=0.5), progress=False)


def test_shards_write_disjoint_stores_that_an_unsharded_run_merges(tmp_path):
    folder = link_images(tmp_path / "images", REGION_IMAGES)
    out = tmp_path / "store"
    for index in range(2):
        report = extract_features(folder, out, small_config(), shard=(index, 2), progress=False)
        assert report.extracted == 1
    assert [len(open_features(out / f"shard-{i}-of-2")) for i in range(2)] == [1, 1]
    merged = extract_features(folder, out, small_config(), progress=False)
    assert (merged.merged_from_shards, merged.extracted, merged.already_done) == (2, 0, 2)
    assert sorted(open_features(out).ids()) == ["1016887272", "101958970"]


def test_coco_annotation_boxes_get_features_for_exactly_those_boxes(tmp_path):
    annotations = shared_path("data", "coco_two_cats", "coco_annotations.txt")
    folder = shared_path("data", "coco_two_cats")
    report = extract_features(folder, tmp_path / "store", small_config(), boxes_file=annotations, progress=False)
    regions = open_features(tmp_path / "store")["000000039769"]
    expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in json.loads(annotations.read_text()))]
    np.testing.assert_allclose(regions.boxes, expected, rtol=1e-6)
    assert regions.features.shape == (6, 1024) and (regions.image_w, regions.image_h) == (640, 480)
    assert sorted(p.rsplit("/", 1)[1] for p in report.ignored_files) == ["PROVENANCE.md", "coco_annotations.txt"]


def test_vcr_metadata_boxes_on_a_blank_image_of_its_size(tmp_path):
    metadata_file = shared_path("data", "vcr", "vcr1images", "lsmdc_3038_ITS_COMPLICATED",
                                "3038_ITS_COMPLICATED_00.03.29.737-00.03.35.073@0.json")
    metadata = json.loads(metadata_file.read_text())
    folder = tmp_path / "images"
    folder.mkdir()
    image_id = metadata_file.stem
    Image.new("RGB", (metadata["width"], metadata["height"]), (127, 127, 127)).save(folder / f"{image_id}.jpg")
    extract_features(folder, tmp_path / "store", small_config(), boxes_file=metadata_file, progress=False)
    regions = open_features(tmp_path / "store")[image_id]
    np.testing.assert_allclose(regions.boxes, np.asarray(metadata["boxes"])[:, :4], rtol=1e-6)
    assert regions.features.shape == (len(metadata["boxes"]), 1024)
    assert np.isfinite(regions.features).all()


def test_weights_load_from_a_saved_state_dict(tmp_path):
    model, _ = build_detector(small_config(seed=7, num_classes=5))
    # trained torchvision detectors use frozen BatchNorm: their state dicts have no batch counters
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    weights = tmp_path / "detector.pt"
    torch.save(state, weights)
    folder, annotations = shared_path("data", "coco_two_cats"), shared_path("data", "coco_two_cats", "coco_annotations.txt")

    extract_features(folder, tmp_path / "loaded", small_config(weights=str(weights)), boxes_file=annotations,
                     progress=False)
    extract_features(folder, tmp_path / "seeded", small_config(seed=7, num_classes=5), boxes_file=annotations,
                     progress=False)
    loaded, seeded = open_features(tmp_path / "loaded"), open_features(tmp_path / "seeded")
    assert loaded["000000039769"].class_probs.shape == (6, 5)
    for a, b in zip(arrays(loaded, "000000039769"), arrays(seeded, "000000039769")):
        np.testing.assert_array_equal(a, b)
    meta = json.loads((tmp_path / "loaded" / "extract_meta.json").read_text())
    assert meta["random_weights"] is False and meta["settings"]["weights_sha256"] == file_sha256(weights)

    del state["backbone.fpn.layer_blocks.0.0.weight"]
    torch.save(state, tmp_path / "incomplete.pt")
    with pytest.raises(ValueError, match=r"incomplete\.pt: does not fit .* missing \['backbone\.fpn\.layer_blocks"):
        build_detector(small_config(weights=str(tmp_path / "incomplete.pt")))


def test_cli_random_weights_warns_writes_tsv_and_fails_on_a_broken_image(tmp_path, capsys):
    folder = link_images(tmp_path / "images", REGION_IMAGES[:1])
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "store"
    code = main(["extract", str(folder), str(out), "--weights", "random", "--tsv", *SMALL_FLAGS])
    err = capsys.readouterr().err
    assert code == 1
    assert "WARNING: --weights random" in err and "broken.png" in err and "1 failed to decode" in err
    store, tsv = open_features(out), open_features(out / "features.tsv")
    assert tsv.ids() == store.ids() == ["1016887272"]
    for a, b in zip(arrays(store, "1016887272"), arrays(tsv, "1016887272")):
        np.testing.assert_array_equal(a, b)
