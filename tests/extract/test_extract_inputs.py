"""``interbert extract``'s inputs without a detector: box files, image naming, sharding, the CLI's
message when torchvision is missing. Runs in the main .venv too (no torchvision needed)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import shared_path

from interbert.cli import main
from interbert.extract.given_boxes import match_given_boxes, read_given_boxes
from interbert.extract.images import (
    ImageDecodeError,
    decode_image,
    list_images,
    parse_shard,
    shard_from_environment,
    shard_ids,
)

VCR_METADATA = "lsmdc_3038_ITS_COMPLICATED/3038_ITS_COMPLICATED_00.03.29.737-00.03.35.073@0.json"


def test_coco_annotation_lines_become_xyxy_boxes_matched_to_the_numbered_image():
    given = read_given_boxes(shared_path("data", "coco_two_cats", "coco_annotations.txt"))
    assert list(given) == ["39769"]
    boxes = given["39769"].boxes
    assert boxes.shape == (6, 4)
    np.testing.assert_allclose(boxes[0], [332.89, 79.57, 332.89 + 38.65, 79.57 + 106.31], rtol=1e-6)
    matched, without_boxes, without_image = match_given_boxes(["000000039769", "other"], given)
    assert list(matched) == ["000000039769"] and without_boxes == ["other"] and without_image == []


def test_official_coco_json_uses_file_names_sizes_and_category_names(tmp_path):
    coco = {
        "images": [{"id": 7, "file_name": "kitchen.jpg", "width": 64, "height": 48}],
        "categories": [{"id": 3, "name": "cup"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 20]}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    given = read_given_boxes(path)["kitchen"]
    assert given.boxes.tolist() == [[1, 2, 11, 22]] and given.names == ["cup"]
    assert (given.width, given.height) == (64, 48)


def test_empty_coco_box_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text('{"image_id": 1, "bbox": [0, 0, 5, 5]}\n{"id": 9, "image_id": 1, "bbox": [0, 0, 0, 5]}\n')
    with pytest.raises(ValueError, match=r"ann\.jsonl:2: annotation 9 of image 1 has an empty bbox"):
        read_given_boxes(path)


def test_vcr_metadata_file_and_folder_give_boxes_scores_names_and_size():
    folder = shared_path("data", "vcr", "vcr1images")
    metadata = json.loads((folder / VCR_METADATA).read_text())
    single = read_given_boxes(folder / VCR_METADATA)
    key = VCR_METADATA.rsplit("/", 1)[1].removesuffix(".json")
    assert list(single) == [key]
    given = single[key]
    np.testing.assert_allclose(given.boxes, np.asarray(metadata["boxes"])[:, :4], rtol=1e-6)
    np.testing.assert_allclose(given.scores, np.asarray(metadata["boxes"])[:, 4], rtol=1e-6)
    assert given.names == metadata["names"] and (given.width, given.height) == (1920, 1040)
    # a folder keys by relative path, which is VCR's img_fn without ".jpg"
    whole = read_given_boxes(folder)
    assert len(whole) == 302 and VCR_METADATA.removesuffix(".json") in whole


def test_image_ids_are_relative_paths_without_suffix_and_other_files_are_listed(tmp_path):
    (tmp_path / "movie").mkdir()
    for name in ["a.jpg", "movie/shot@0.png", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    images, others = list_images(tmp_path)
    assert list(images) == ["a", "movie/shot@0"]
    assert [p.name for p in others] == ["notes.txt"]
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="two images share the id 'a'"):
        list_images(tmp_path)


def test_shards_are_disjoint_and_cover_every_id():
    ids = [f"img{i}" for i in range(11)]
    shards = [shard_ids(ids, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids)
    assert parse_shard("2/3") == (2, 3)
    with pytest.raises(ValueError, match="need 0 <= i < n"):
        parse_shard("3/3")


def test_torchrun_rank_and_world_size_pick_the_shard():
    assert shard_from_environment({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4)
    assert shard_from_environment({}) == (0, 1)
    with pytest.raises(ValueError, match="RANK=4 is outside WORLD_SIZE=4"):
        shard_from_environment({"RANK": "4", "WORLD_SIZE": "4"})


def test_undecodable_file_raises_with_its_name(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        decode_image(broken)
    image = decode_image(shared_path("data", "coco_two_cats", "000000039769.png"))
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8


def test_cli_lists_extract_and_explains_a_missing_torchvision(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "extract" in capsys.readouterr().out
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here: the missing-torchvision message cannot show")
    assert main(["extract", str(tmp_path), str(tmp_path / "out"), "--weights", "random"]) == 2
    assert "make venv-extract" in capsys.readouterr().err


def test_image_decoding_and_the_extras_hint_are_the_librarys_under_their_old_names():
    """Scripts import decoding and the hint from ``interbert.extract``: those names are the library's objects
    (interbert.detection, which the processor uses), not copies that could drift from what the processor runs."""
    from interbert import detection
    from interbert.detection import images as library_images
    from interbert.extract import command, images

    for name in ("ImageDecodeError", "decode_image", "upright_rgb", "image_pixels"):
        assert getattr(images, name) is getattr(library_images, name), name
    assert command.MISSING_TORCHVISION_HINT is detection.MISSING_TORCHVISION_HINT
