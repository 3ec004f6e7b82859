"""The generated benchmark: reproducible bytes, detector IoU structure, twins, and loadable outputs."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from interbert.data.captions import read_captions
from interbert.data.check import check_data
from interbert.data.features import open_features
from interbert.data.masking import region_iou
from interbert.synthetic import generate
from interbert.synthetic.benchmark import SynthSettings, twin_examples
from interbert.synthetic.detector import AttributeCodes, simulate_detections
from interbert.synthetic.language import caption_holds, label_words
from interbert.synthetic.scenes import KINDS, box_iou, sample_scene

SMALL = dict(images=60, feature_dim=24, num_classes=32, workers=1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=3, **SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(synth, tmp_path):
    generate(tmp_path / "again", seed=3, **(SMALL | {"workers": 2}))
    first, again = _files(synth), _files(tmp_path / "again")
    assert first.keys() == again.keys()
    assert [name for name in first if first[name] != again[name]] == []


def test_another_seed_gives_other_data(synth, tmp_path):
    generate(tmp_path / "other", seed=4, **SMALL)
    for name in ("regions.tsv", "captions.json", "scenes.jsonl", "vcr/train.jsonl", "glue/train.tsv", "images/0.png"):
        assert (synth / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), name


def test_proposals_form_tight_groups_per_object_and_loose_background():
    codes = AttributeCodes.from_seed(0, 16)
    rng = np.random.default_rng(0)
    for image_id in range(40):
        scene = sample_scene(image_id, rng, 128, 96)
        det = simulate_detections(scene, codes, 32, rng)
        iou = box_iou(det.boxes, det.boxes)
        for k, obj in enumerate(scene.objects):
            group = np.flatnonzero(det.object_index == k)
            assert len(group) >= 3
            assert iou[np.ix_(group, group)].min() >= 0.5
            # So the data layer's MRM (IoU >= 0.4 with an anchor) masks a whole object whichever proposal anchors.
            masked_with = region_iou(det.boxes)[group] >= 0.4
            assert masked_with[:, group].all()
            assert box_iou(det.boxes[group], np.array([obj.box])).min() >= 0.65
        background = np.flatnonzero(det.object_index < 0)
        assert len(background) >= 1
        others = iou[background]
        others[np.arange(len(background)), background] = 0.0
        assert others.max() < 0.3


def test_neighbouring_proposals_leak_the_masked_ones_content_and_classes_peak_on_the_kind():
    codes = AttributeCodes.from_seed(1, 256)
    rng = np.random.default_rng(1)
    scene = sample_scene(0, rng, 128, 96)
    det = simulate_detections(scene, codes, 1601, rng)
    unit = det.features / np.linalg.norm(det.features, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -1.0)
    is_object = det.object_index >= 0
    nearest = similarity.argmax(axis=1)
    # The most similar other proposal of an object proposal belongs to the same object.
    assert (det.object_index[nearest][is_object] == det.object_index[is_object]).all()
    np.testing.assert_allclose(det.class_probs.sum(axis=1), 1.0, atol=1e-5)
    expected = [1 + KINDS.index(scene.objects[o].kind) if o >= 0 else 0 for o in det.object_index]
    assert det.class_probs.argmax(axis=1).tolist() == expected


def test_twin_captions_share_their_words_but_are_true_of_one_twin_only():
    settings = SynthSettings(images=40, seed=5)
    for pair in range(8):
        a, b = twin_examples(100 + 2 * pair, pair, settings)
        assert a.scene.twin_of == b.scene.image_id and b.scene.twin_of == a.scene.image_id
        assert a.scene.objects != b.scene.objects
        # The same words name the objects of both twins: only their binding to objects differs.
        assert Counter(label_words(a.scene, "en")) == Counter(label_words(b.scene, "en"))
        for ca, cb in zip(a.captions, b.captions, strict=True):
            assert Counter(ca.tokens) == Counter(cb.tokens)
            assert caption_holds(ca.plan, a.scene, a.scene) and not caption_holds(ca.plan, a.scene, b.scene)
            assert caption_holds(cb.plan, b.scene, b.scene) and not caption_holds(cb.plan, b.scene, a.scene)


def test_readme_reports_the_bag_of_words_baseline_at_or_below_chance_on_twins(synth):
    manifest = json.loads((synth / "synth.json").read_text())
    baseline = manifest["baseline_bag_of_words"]
    assert baseline["twin_captions"] == 5 * manifest["splits"]["test"]
    assert baseline["twin_R@1"] <= 0.5  # ties count against the baseline
    assert baseline["twin_R@1_coin"] <= 0.5
    readme = (synth / "README.md").read_text()
    assert f"{100 * baseline['twin_R@1']:.1f}%" in readme and "simulated" in readme


def test_regions_and_captions_load_through_the_data_layer(synth):
    manifest = json.loads((synth / "synth.json").read_text())
    store = open_features(synth / manifest["files"]["regions"])
    assert len(store) == SMALL["images"] and store.feature_dim == SMALL["feature_dim"]
    captions = read_captions(synth / manifest["files"]["captions"])
    assert len(captions) == 5 * SMALL["images"]
    assert {c.image_id for c in captions} == set(store.ids())
    assert Counter(c.split for c in captions)["test"] == 5 * manifest["splits"]["test"]
    regions = store["0"]
    assert regions.class_probs.shape == (regions.num_regions, SMALL["num_classes"])
    assert (regions.image_w, regions.image_h) == (128, 96)
    assert (synth / "images" / "0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not check_data(captions, store).errors  # what `interbert data check` reports


def test_regions_tsv_is_byte_identical_to_the_data_layers_tsv_writer(synth, tmp_path):
    from interbert.data.features import write_tsv

    store = open_features(synth / "regions.tsv")
    write_tsv(tmp_path / "rewritten.tsv", store.items(), with_class_probs=True)
    assert (tmp_path / "rewritten.tsv").read_bytes() == (synth / "regions.tsv").read_bytes()


@pytest.mark.parametrize("fmt", ["npz", "store"])
def test_other_feature_formats_hold_the_same_regions(synth, tmp_path, fmt):
    generate(tmp_path / fmt, seed=3, fmt=fmt, **(SMALL | {"images": 20}) | {"render_images": False})
    small = tmp_path / "tsv"
    generate(small, seed=3, **(SMALL | {"images": 20}) | {"render_images": False})
    ours, reference = open_features(tmp_path / fmt / "regions"), open_features(small / "regions.tsv")
    assert sorted(ours.ids()) == sorted(reference.ids())
    for image_id in ("0", "19"):
        np.testing.assert_array_equal(ours[image_id].features, reference[image_id].features)
        np.testing.assert_array_equal(ours[image_id].class_probs, reference[image_id].class_probs)
    generate(tmp_path / "again", seed=3, fmt=fmt, **(SMALL | {"images": 20}) | {"render_images": False})
    assert _files(tmp_path / fmt) == _files(tmp_path / "again")  # these layouts are reproducible too


def test_vcr_files_follow_the_real_vcr_schema(synth):
    from conftest import shared_path

    from interbert.data.vcr import read_vcr
    from interbert.extract.given_boxes import read_given_boxes

    real = json.loads(shared_path("data", "vcr", "train.jsonl").read_text().splitlines()[0])
    lines = (synth / "vcr" / "train.jsonl").read_text().splitlines()
    manifest = json.loads((synth / "synth.json").read_text())
    splits = manifest["splits"]
    assert len(lines) == splits["train"]
    # The data layer's VCR reader takes every line (it checks tags, labels, metadata and names).
    vcr_files = manifest["files"]["vcr"]
    for split in ("train", "val"):
        items = read_vcr(synth / vcr_files[split], images_root=synth / vcr_files["images_root"])
        assert len(items) == splits[split]
        assert {item.image_id for item in items} <= set(open_features(synth / "regions.tsv").ids())
    # The metadata JSONs load through the project's VCR box reader (as `interbert extract --boxes` uses it).
    given = read_given_boxes(synth / "images")
    assert len(given) == splits["train"] + splits["val"] and given["0"].width == 128
    for line in lines:
        item = json.loads(line)
        assert {"question", "answer_choices", "rationale_choices", "objects", "answer_label", "rationale_label",
                "img_fn", "metadata_fn", "annot_id"} <= item.keys() <= real.keys() | {"img_id", "question_number"}
        assert len(item["answer_choices"]) == len(item["rationale_choices"]) == 4
        metadata = json.loads((synth / "images" / item["metadata_fn"]).read_text())
        assert {"boxes", "names", "width", "height"} <= metadata.keys()
        assert metadata["names"] == item["objects"] and all(len(b) == 5 for b in metadata["boxes"])
        for tokens in [item["question"], *item["answer_choices"], *item["rationale_choices"]]:
            for token in tokens:  # a word, or a tag list of object indices as in VCR
                assert isinstance(token, str) or all(0 <= t < len(item["objects"]) for t in token)
        assert any(isinstance(t, list) for t in item["question"])  # the question needs a tagged object


def test_vcr_right_answers_are_true_of_the_tagged_objects(synth):
    scenes = {s["image_id"]: s for s in map(json.loads, (synth / "scenes.jsonl").read_text().splitlines())}
    kinds_of_question = Counter()
    lines = [line for split in ("train", "val") for line in (synth / "vcr" / f"{split}.jsonl").read_text().splitlines()]
    for item in map(json.loads, lines):
        objects = scenes[int(item["annot_id"].split("-")[1])]["objects"]
        answer = item["answer_choices"][item["answer_label"]]
        if item["question"][:2] == ["What", "colour"]:
            kinds_of_question["colour"] += 1
            (tag,) = item["question"][3]
            assert answer[2] == objects[tag]["colour"]
            assert sum(a[2] == objects[tag]["colour"] for a in item["answer_choices"]) == 1
        else:
            kinds_of_question["where"] += 1
            (a,), (b,) = item["question"][2], item["question"][5]
            (ax, ay), (bx, by) = [((o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2)
                                  for o in (objects[a], objects[b])]
            relation = " ".join(answer[2:-2])  # [a] is <relation> [b] .
            assert {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]
    assert kinds_of_question["colour"] > 0 and kinds_of_question["where"] > 0


def test_glue_pairs_use_the_mrpc_layout(synth):
    from conftest import shared_path

    with open(shared_path("data", "glue", "MRPC", "dev.tsv"), encoding="utf-8-sig") as f:
        mrpc_header = f.readline().rstrip("\n").split("\t")
    for name in ("train", "dev"):
        with open(synth / "glue" / f"{name}.tsv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        assert list(rows[0].keys()) == mrpc_header
        assert {r["Quality"] for r in rows} == {"0", "1"}
        assert all(r["#1 String"] and r["#2 String"] for r in rows)


def test_chinese_captions_describe_the_same_scenes(synth, tmp_path):
    generate(tmp_path / "zh", seed=3, lang="zh", **(SMALL | {"images": 30}) | {"render_images": False})
    generate(tmp_path / "en", seed=3, lang="en", **(SMALL | {"images": 30}) | {"render_images": False})
    assert (tmp_path / "zh" / "scenes.jsonl").read_bytes() == (tmp_path / "en" / "scenes.jsonl").read_bytes()
    karpathy = json.loads((tmp_path / "zh" / "captions.json").read_text(encoding="utf-8"))
    raw = [s["raw"] for image in karpathy["images"] for s in image["sentences"]]
    assert all(r.endswith("。") and any("\u4e00" <= ch <= "\u9fff" for ch in r) for r in raw)


def test_cli_writes_the_benchmark(tmp_path, capsys):
    import argparse

    from interbert.cli import COMMAND_MODULES
    from interbert.synthetic.cli import register

    assert "interbert.synthetic.cli" in COMMAND_MODULES
    parser = argparse.ArgumentParser(prog="interbert")  # only this command: the full CLI imports every module
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["data", "synth", str(out), "--images", "24", "--feature-dim", "8",
                              "--num-classes", "10", "--no-images", "--workers", "1"])
    assert args.func(args) == 0
    assert "twin R@1" in capsys.readouterr().out
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["settings"]["feature_dim"] == 8 and not list((out / "images").glob("*.png"))


def test_regenerating_replaces_the_earlier_benchmark_and_spares_other_folders(tmp_path):
    out = tmp_path / "bench"
    generate(out, seed=1, **(SMALL | {"images": 40}))
    generate(out, seed=1, fmt="store", **(SMALL | {"images": 20}))
    assert not (out / "regions.tsv").exists() and not (out / "images" / "30.png").exists()
    assert len(open_features(out / "regions")) == 20
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        generate(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad, message", [
    (dict(lang="fr"), "language"),
    (dict(fmt="hdf5"), "format"),
    (dict(num_classes=3), "num_classes"),
    (dict(images=3), "cannot split"),
])
def test_bad_settings_are_refused_with_a_clear_message(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "bad", **(SMALL | bad))
