"""Issue 28's knobs on the built-in benchmark: each does what its flag says, is recorded in synth.json, and a
bad value is one ``error:`` line naming the flag. (That the defaults leave the bytes as they were is
tests/synthetic/test_synthetic_defaults.py.)"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from interbert.cli import main
from interbert.data.features import open_features
from interbert.data.masking import IOU_GROUP_THRESHOLD, region_iou
from interbert.synthetic import generate
from interbert.synthetic.detector import AttributeCodes, DetectorKnobs, simulate_detections
from interbert.synthetic.scenes import sample_scene

SMALL = dict(feature_dim=32, num_classes=8, render_images=False, workers=1)


def _detections(knobs: DetectorKnobs, scenes: int = 40):
    codes = AttributeCodes.from_seed(0, 32)
    for i in range(scenes):
        rng = np.random.default_rng([5, i])
        yield simulate_detections(sample_scene(i, rng, 128, 96), codes, 8, rng, knobs)


def _same_object_pairs(knobs: DetectorKnobs) -> tuple[np.ndarray, np.ndarray]:
    """IoU and feature cosine of every two proposals of one object, over 40 scenes."""
    ious, cosines = [], []
    for d in _detections(knobs):
        iou = region_iou(d.boxes)
        unit = d.features / np.linalg.norm(d.features, axis=1, keepdims=True)
        for obj in set(d.object_index.tolist()) - {-1}:
            members = np.flatnonzero(d.object_index == obj)
            a, b = np.triu_indices(len(members), k=1)
            ious.extend(iou[members[a], members[b]])
            cosines.extend((unit[members[a]] * unit[members[b]]).sum(1))
    return np.array(ious), np.array(cosines)


def _neighbours_in_files(out: Path) -> float:
    """Mean count, over every detector region of the written store, of the other regions whose IoU with it is
    >= the masking threshold: what group masking masks beside an anchor, and plain masking leaves to leak."""
    store = open_features(out / "regions.tsv")
    counts = [(region_iou(store[i].boxes) >= IOU_GROUP_THRESHOLD).sum(1) - 1 for i in store.ids()]
    return float(np.concatenate(counts).mean())


def test_more_proposals_per_object_give_more_regions_in_the_anchors_group(tmp_path):
    found = {}
    for span in ((1, 1), (3, 4), (6, 8)):
        out = tmp_path / f"p{span[0]}"
        manifest = generate(out, images=40, seed=1, proposals_per_object=span, **SMALL)
        recorded = json.loads((out / "synth.json").read_text())
        assert recorded["settings"]["proposals_per_object"] == list(span)
        assert manifest["detector"]["max_boxes"] == 5 * span[1] + 3
        found[span] = _neighbours_in_files(out)
    # one proposal per object: no region overlaps another enough to be masked with it, nothing to leak
    assert found[(1, 1)] < 0.05
    assert 2.0 < found[(3, 4)] < 3.5 < 5.0 < found[(6, 8)]


def test_a_lower_group_iou_spreads_the_proposals_out_of_the_anchors_group():
    ious = {g: _same_object_pairs(DetectorKnobs(group_iou=g))[0] for g in (0.2, 0.5, 0.8)}
    for g, values in ious.items():
        assert values.min() >= g - 1e-9  # the knob's promise: the least IoU of two proposals of an object
    assert ious[0.2].mean() < ious[0.5].mean() < ious[0.8].mean()
    outside = {g: float((values < IOU_GROUP_THRESHOLD).mean()) for g, values in ious.items()}
    # at the default every proposal of an object is in each other's masking group; at 0.2 many are not,
    # so group masking leaves part of the object beside a masked anchor
    assert outside[0.5] == 0.0 and outside[0.8] == 0.0
    assert outside[0.2] > 0.2


def test_more_feature_noise_makes_the_proposals_of_one_object_less_alike():
    cosine = {noise: _same_object_pairs(DetectorKnobs(feature_noise=noise))[1].mean() for noise in (0.0, 0.5, 2.0)}
    assert cosine[0.0] > 0.9  # without noise only the box's fit to the object tells them apart
    assert cosine[0.0] > cosine[0.5] + 0.1 > cosine[2.0] + 0.2


def test_feature_noise_in_the_written_regions(tmp_path):
    """Through the files: regions that group masking would mask together are less alike with more noise."""
    def group_cosine(noise: float) -> float:
        out = tmp_path / f"n{noise}"
        manifest = generate(out, images=30, seed=2, feature_noise=noise, **SMALL)
        assert manifest["settings"]["feature_noise"] == noise
        store, values = open_features(out / "regions.tsv"), []
        for image_id in store.ids():
            regions = store[image_id]
            unit = regions.features / np.linalg.norm(regions.features, axis=1, keepdims=True)
            together = np.triu(region_iou(regions.boxes) >= IOU_GROUP_THRESHOLD, k=1)
            values.extend((unit @ unit.T)[together])
        return float(np.mean(values))

    assert group_cosine(0.25) > group_cosine(1.0) + 0.2


def _captions(out: Path) -> list[dict]:
    return json.loads((out / "captions.json").read_text())["images"]


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_twin_share_is_the_measured_share_of_train_images_in_twin_pairs(share, tmp_path):
    manifest = generate(tmp_path / "t", images=120, seed=4, val_images=10, test_images=10, twin_share=share, **SMALL)
    images = _captions(tmp_path / "t")
    by_id = {e["imgid"]: e for e in images}
    train = [e for e in images if e["split"] == "train"]
    twins = [e for e in train if "twin_of" in e]
    assert len(train) == 100
    assert len(twins) / len(train) == pytest.approx(share, abs=0.02)
    assert manifest["splits"]["train_twin_pairs"] == len(twins) // 2 == 50 * share // 1
    assert manifest["settings"]["twin_share"] == share
    for e in twins:  # pairs within train, each the other's twin, captions of the same words bound otherwise
        other = by_id[e["twin_of"]]
        assert other["split"] == "train" and other["twin_of"] == e["imgid"]
        for mine, theirs in zip(e["sentences"], other["sentences"]):
            assert Counter(mine["tokens"]) == Counter(theirs["tokens"]) and mine["raw"] != theirs["raw"]
    # the other splits as before: val without twins (fine-tuning data stays plain), test all twins
    assert not any("twin_of" in e for e in images if e["split"] == "val")
    assert all("twin_of" in e for e in images if e["split"] == "test")


def test_knobs_keep_the_bytes_independent_of_the_workers(tmp_path):
    """Train twin pairs must never straddle two chunks (120 images: chunks end at 50 and 100)."""
    knobs = dict(twin_share=0.6, proposals_per_object=(2, 5), group_iou=0.3, feature_noise=0.8)
    generate(tmp_path / "one", images=120, seed=6, **(SMALL | knobs))
    generate(tmp_path / "two", images=120, seed=6, **(SMALL | knobs | {"workers": 2}))
    for name in ("regions.tsv", "captions.json", "scenes.jsonl", "synth.json", "README.md"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_cli_records_the_knobs_and_its_readme_gives_the_command_that_regenerates_them(tmp_path, capsys):
    out = tmp_path / "knobs"
    assert main(["data", "synth", str(out), "--images", "40", "--feature-dim", "16", "--num-classes", "8",
                 "--no-images", "--proposals-per-object", "2-5", "--group-iou", "0.3", "--feature-noise", "1.5",
                 "--twin-share", "0.5"]) == 0
    assert "32 train (8 twin pairs)" in capsys.readouterr().out  # half of the train images in pairs
    settings = json.loads((out / "synth.json").read_text())["settings"]
    assert (settings["proposals_per_object"], settings["group_iou"], settings["feature_noise"],
            settings["twin_share"]) == ([2, 5], 0.3, 1.5, 0.5)
    readme = (out / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("Generated by"))
    assert "--proposals-per-object 2-5 --group-iou 0.3 --feature-noise 1.5 --twin-share 0.5" in command
    argv = command.split("`")[1].split()[1:]  # data synth OUT ...
    again = tmp_path / "again"
    assert main([*argv[:2], str(again), *argv[3:]]) == 0
    assert (again / "regions.tsv").read_bytes() == (out / "regions.tsv").read_bytes()
    assert (again / "captions.json").read_bytes() == (out / "captions.json").read_bytes()


@pytest.mark.parametrize("flag, value, named", [
    ("--twin-share", "1.5", "--twin-share"),
    ("--twin-share", "nan", "--twin-share"),
    ("--group-iou", "1", "--group-iou"),
    ("--group-iou", "0.05", "--group-iou"),
    ("--feature-noise", "-0.1", "--feature-noise"),
    ("--feature-noise", "inf", "--feature-noise"),
    ("--proposals-per-object", "4-2", "--proposals-per-object"),
    ("--proposals-per-object", "0", "--proposals-per-object"),
    ("--proposals-per-object", "17", "--proposals-per-object"),
])
def test_a_bad_knob_is_one_error_line_naming_the_flag(flag, value, named, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INTERBERT_DEBUG", raising=False)
    out = tmp_path / "bad"
    code = main(["data", "synth", str(out), "--images", "20", "--feature-dim", "8", "--num-classes", "8",
                 "--no-images", f"{flag}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: data synth: ") and named in err
    assert not out.exists()  # refused before anything was written
