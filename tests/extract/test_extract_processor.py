"""``InterBertProcessor(images=...)``: image files through ``interbert extract``'s detector (issue 27).

The detector tests need torchvision (``make test-extract``) and use seeded random weights at a small
size, as tests/extract/test_extract.py does; the rest runs in the main .venv too, where asking for a detector
is the ``[extract]`` extra's one-line error.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import minilm_vocab, shared_path

from interbert.data.features import open_features
from interbert.data.tokenize import load_tokenizer
from interbert.errors import DataError, UsageError
from interbert.processing import REGION_KEYS, InterBertProcessor

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
needs_torchvision = pytest.mark.skipif(
    not HAS_TORCHVISION, reason="the processor's detector needs torchvision: run `make test-extract` (.venv-extract)"
)
SMALL = {"min_size": 192, "max_size": 256, "num_proposals": 100}
SMALL_FLAGS = ["--min-size", "192", "--max-size", "256", "--num-proposals", "100", "--no-progress"]
IMAGES = ["1016887272.jpg", "101958970.jpg"]


def image(name: str):
    return shared_path("data", "regions", "images", name)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(minilm_vocab())


@pytest.fixture(scope="module")
def random_detector(tokenizer):
    """A processor with `interbert extract --weights random`'s detector at the small test size."""
    return InterBertProcessor(tokenizer).set_detector("random", seed=0, **SMALL)


def assert_same_inputs(got, want, atol=1e-6):
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol if key in REGION_KEYS else 0, msg=key)


@needs_torchvision
def test_images_give_the_entries_of_the_store_interbert_extract_writes(random_detector, tmp_path):
    from PIL import Image

    from interbert.cli import main
    from interbert.extract.images import decode_image

    folder = tmp_path / "images"
    folder.mkdir()
    for name in IMAGES:
        (folder / name).symlink_to(image(name))
    assert main(["extract", str(folder), str(tmp_path / "store"), "--weights", "random", *SMALL_FLAGS]) == 0
    store = open_features(tmp_path / "store")
    first, second = (name.removesuffix(".jpg") for name in IMAGES)

    texts = ["a dog runs", "two people", "a dog"]
    with Image.open(image(IMAGES[1])) as opened:  # a path, a PIL image, an array: the three forms
        from_images = random_detector(text=texts, images=[image(IMAGES[0]), opened, decode_image(image(IMAGES[0]))])
    from_store = random_detector(text=texts, regions=[store[first], store[second], store[first]])
    assert_same_inputs(from_images, from_store)
    detected = random_detector.detect(str(image(IMAGES[1])))[0]  # the raw entry, class distributions included
    for key in ("features", "boxes", "class_probs"):
        np.testing.assert_allclose(getattr(detected, key), getattr(store[second], key), rtol=0, atol=1e-6, err_msg=key)
    assert (detected.image_w, detected.image_h) == (store[second].image_w, store[second].image_h)


@needs_torchvision
def test_the_detector_is_the_librarys_under_its_old_extract_names():
    """``interbert extract`` and the processor run one detector: the library's (interbert.detection), which
    scripts still import from ``interbert.extract.detector`` / ``interbert.extract.in_memory``."""
    from interbert.detection import detector, image_detector
    from interbert.extract import detector as old_detector
    from interbert.extract import in_memory, run

    for old, library in ((old_detector, detector), (in_memory, image_detector)):
        assert old.__all__ and all(getattr(old, name) is getattr(library, name) for name in old.__all__), old
    assert {"RegionDetector", "DetectorConfig", "build_detector", "ImageRegions"} <= set(old_detector.__all__)
    assert {"ImageDetector", "detector_config", "SETTING_TYPES"} <= set(in_memory.__all__)
    assert run.RegionDetector is detector.RegionDetector and run.default_device is detector.default_device


@needs_torchvision
def test_a_saved_detector_path_is_read_only_when_asked(tokenizer, tmp_path):
    from transformers import AutoProcessor

    from interbert.extract.detector import DetectorConfig, build_detector

    model, _ = build_detector(DetectorConfig(seed=7, num_classes=5, **SMALL))
    weights = tmp_path / "detector.pt"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, weights)
    proc = InterBertProcessor(tokenizer, max_regions=12).set_detector(str(weights), **SMALL)
    want = proc(images=image(IMAGES[0]))
    assert want["region_features"].shape == (1, 12, 1024)
    folder = tmp_path / "processor"
    proc.save_pretrained(folder)
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["detector"] == str(weights) and saved["detector_settings"]["min_size"] == 192

    hidden = weights.rename(tmp_path / "elsewhere.pt")  # a load that read the weights would fail now
    plain = InterBertProcessor.from_pretrained(folder)
    assert plain.detector == str(weights) and plain(text="a dog")["input_ids"].shape[0] == 1
    with pytest.raises(UsageError, match=r"names one \(.*detector\.pt\) but does not load it unless asked"):
        plain(images=image(IMAGES[0]))
    with pytest.raises(DataError, match="detector weights not found: .*detector.pt"):
        InterBertProcessor.from_pretrained(folder, detector=True)

    hidden.rename(weights)
    for asked in (InterBertProcessor.from_pretrained(folder, detector=True),
                  AutoProcessor.from_pretrained(folder, detector=str(weights))):
        assert asked.max_regions == 12 and asked.detector_settings == proc.detector_settings
        assert_same_inputs(asked(images=image(IMAGES[0])), want, atol=0)


@needs_torchvision
def test_a_bad_image_or_setting_is_one_line_naming_it(random_detector, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated before any image data")
    with pytest.raises(DataError, match=r"images\[1\]: cannot decode the image: .*broken\.jpg") as error:
        random_detector(images=[image(IMAGES[0]), broken])
    assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match=r"images\[0\]: an image array must be H x W x 3 uint8 RGB, got float32"):
        random_detector(images=[np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(UsageError, match="give regions=... or images=..., not both"):
        random_detector(images=[broken], regions=[broken])
    with pytest.raises(UsageError, match=r"unknown detector setting 'min_sise'; known: detector, num_classes"):
        InterBertProcessor(random_detector.tokenizer).set_detector("random", min_sise=100)
    with pytest.raises(UsageError, match="detector setting score_threshold must be float, not 'high'"):
        InterBertProcessor(random_detector.tokenizer).set_detector("random", score_threshold="high")
    with pytest.raises(UsageError, match=r"need 0 <= min_regions <= max_regions"):
        InterBertProcessor(random_detector.tokenizer).set_detector("random", min_regions=40)
    InterBertProcessor(random_detector.tokenizer, detector="random", detector_settings={"min_sise": 100}).save_pretrained(
        tmp_path / "folder")
    with pytest.raises(UsageError, match=r"folder/processor_config\.json: unknown detector setting 'min_sise'"):
        InterBertProcessor.from_pretrained(tmp_path / "folder", detector=True)


def test_a_folder_naming_a_detector_loads_without_reading_it(tokenizer, tmp_path):
    """No torchvision needed: the recorded path is kept, not used, until the caller asks."""
    named = InterBertProcessor(tokenizer, detector=str(tmp_path / "absent.pt"), detector_settings={"min_size": 192})
    named.save_pretrained(tmp_path / "processor")
    loaded = InterBertProcessor.from_pretrained(tmp_path / "processor")
    assert loaded.detector == str(tmp_path / "absent.pt") and loaded.detector_settings == {"min_size": 192}
    assert loaded(text=["a dog", "a cat"])["input_ids"].shape[0] == 2
    with pytest.raises(UsageError, match="does not load it unless asked: InterBertProcessor.from_pretrained"):
        loaded(images=image(IMAGES[0]))
    with pytest.raises(UsageError, match=r"images= needs a detector: proc\.set_detector\(weights\)"):
        InterBertProcessor(tokenizer)(images=image(IMAGES[0]))


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed here: the missing-extra error cannot show")
def test_asking_for_a_detector_without_torchvision_is_the_extras_one_line_error(tokenizer, tmp_path):
    from interbert.extras import MissingExtraError

    with pytest.raises(MissingExtraError, match=r"InterBertProcessor's detector needs torchvision, which is not "
                                                r"installed: pip install 'interbert\[extract\]'") as error:
        InterBertProcessor(tokenizer).set_detector("random")
    assert "\n" not in str(error.value)
    InterBertProcessor(tokenizer, detector="random").save_pretrained(tmp_path)
    with pytest.raises(MissingExtraError, match="make venv-extract"):
        InterBertProcessor.from_pretrained(tmp_path, detector=True)
