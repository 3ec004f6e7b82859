"""The VCR reader: real lines parse with nothing lost, tags become the right names and boxes, bad input
is reported by file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from interbert.data.errors import DataFormatError
from interbert.errors import DataError
from interbert.data.features import FeatureStore, Regions
from interbert.data.vcr import (
    PERSON_NAMES,
    VcrDataset,
    collate_choices,
    item_regions,
    object_names,
    read_vcr,
    task_objects,
    task_texts,
    vcr_standin_features,
)


@pytest.fixture(scope="module")
def real_items():
    return read_vcr(shared_path("data", "vcr", "train.jsonl"))


class WordTokenizer:
    """Enough of a BERT tokenizer for the dataset: one id per whitespace word, pairs with segments."""

    def __init__(self):
        self.vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2}

    def _ids(self, text):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def __call__(self, firsts, seconds, truncation, max_length):
        ids, types = [], []
        for a, b in zip(firsts, seconds):
            a, b = self._ids(a), self._ids(b)
            ids.append([1, *a, 2, *b, 2][:max_length])
            types.append(([0] * (len(a) + 2) + [1] * (len(b) + 1))[:max_length])
        return {"input_ids": ids, "token_type_ids": types}


def test_all_real_lines_and_metadata_parse_without_loss(real_items):
    path = shared_path("data", "vcr", "train.jsonl")
    root = path.parent / "vcr1images"
    raw_lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(raw_lines) == 800 and len(real_items) == 800
    for raw, item in zip(raw_lines, real_items):
        assert item.annot_id == raw["annot_id"]
        assert item.question == raw["question"]
        assert item.answer_choices == raw["answer_choices"] and item.rationale_choices == raw["rationale_choices"]
        assert (item.answer_label, item.rationale_label) == (raw["answer_label"], raw["rationale_label"])
        assert item.objects == raw["objects"]
        assert item.image_id == Path(raw["img_fn"]).stem
        meta = json.loads((root / raw["metadata_fn"]).read_text())
        np.testing.assert_allclose(item.metadata.boxes, np.asarray(meta["boxes"])[:, :4], rtol=1e-6)
        np.testing.assert_allclose(item.metadata.scores, np.asarray(meta["boxes"])[:, 4], rtol=1e-6)
        assert item.metadata.names == meta["names"]
        assert (item.metadata.width, item.metadata.height) == (meta["width"], meta["height"])
    assert len({id(i.metadata) for i in real_items}) == 302  # every metadata file, each read once


def test_person_tags_become_names_in_person_order(real_items):
    # line 2: "Why is 1 smiling at 2?" with objects person, person, bottle
    item = real_items[1]
    assert object_names(item.objects) == ["Casey", "Riley", "bottle"]
    question, answer = task_texts(item, "Q->A")[2]
    assert question == "Why is Casey smiling at Riley ?"
    assert answer == "Riley has spinach in her teeth ."
    context, rationale = task_texts(item, "QA->R")[1]
    assert context == "Why is Casey smiling at Riley ? Riley has spinach in her teeth ."  # the right answer
    assert rationale == "Casey is smiling and appears to be looking at the mouth of Riley ."


def test_tag_lists_and_objects_map_to_their_names_and_boxes(real_items):
    # line 71: "What is 4 and 9 doing?" -> [3, 8]; the right answer tags [18], a diningtable
    item = real_items[70]
    names = object_names(item.objects)
    assert names[3] == PERSON_NAMES[3] and names[8] == PERSON_NAMES[8] and names[18] == "diningtable"
    question, answer = task_texts(item, "Q->A")[item.answer_label]
    assert question == f"What is {PERSON_NAMES[3]} and {PERSON_NAMES[8]} doing ?"
    assert answer == "They are sitting down eating at diningtable ."
    assert task_objects(item, "Q->A") == [3, 8, 4, 18, 1]  # first mention order over question and answers

    ds = VcrDataset([item], WordTokenizer(), store=None, tasks=["Q->A"], feature_dim=16, max_regions=36)
    example = ds[0]
    w, h = item.metadata.width, item.metadata.height
    for position, obj in enumerate([3, 8, 4, 18, 1], start=1):  # position 0 is the global region
        x1, y1, x2, y2 = item.metadata.boxes[obj]
        np.testing.assert_allclose(example["region_boxes"][position, :4], [x1 / w, y1 / h, x2 / w, y2 / h], rtol=1e-5)
    assert len(example["region_features"]) == 1 + len(item.objects)  # every detection, tagged ones first
    assert example["labels"] == item.answer_label
    stand_in = vcr_standin_features(item.metadata.boxes[[18]], ["diningtable"], w, h, 16)
    np.testing.assert_allclose(example["region_features"][4], stand_in[0])


def test_standin_features_are_deterministic_and_tell_classes_apart():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    a = vcr_standin_features(boxes, ["person", "bottle"], 20, 20, 32)
    b = vcr_standin_features(boxes, ["person", "bottle"], 20, 20, 32)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])
    moved = vcr_standin_features(boxes + 5, ["person", "bottle"], 20, 20, 32)
    assert not np.allclose(a[0], moved[0])


def _write_lines(tmp_path: Path, lines: list[str], metadata: dict | None) -> Path:
    (tmp_path / "vcr1images").mkdir()
    if metadata is not None:
        (tmp_path / "vcr1images" / "a.json").write_text(json.dumps(metadata))
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


META = {"boxes": [[0, 0, 5, 5, 0.9], [5, 5, 10, 10, 0.8]], "names": ["person", "cup"], "width": 10, "height": 10,
        "segms": []}


def _line(**changes) -> str:
    raw = {"question": ["Who", "holds", [1], "?"], "answer_choices": [[[0], "."], ["b"], ["c"], ["d"]],
           "rationale_choices": [["e"], ["f"], ["g"], ["h"]], "answer_label": 0, "rationale_label": 1,
           "objects": ["person", "cup"], "img_fn": "a.jpg", "metadata_fn": "a.json", "annot_id": "t-1"}
    raw.update(changes)
    return json.dumps(raw)


def test_synthetic_line_reads(tmp_path):
    (item,) = read_vcr(_write_lines(tmp_path, [_line()], META))
    assert task_texts(item, "Q->A")[0] == ("Who holds cup ?", "Casey .")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        (_line(question=["Who", "holds", [2], "?"]), "tags object(s) [2]"),
        (_line(answer_choices=[["a"], ["b"]]), "answer_choices must hold 4"),
        (_line(rationale_label=7), "rationale_label must be 0-3"),
        (_line(objects=["person", "dog"]), "do not match the names"),
        (_line(metadata_fn="missing.json"), "missing.json"),
        (_line(img_fn=None), "img_fn must be a file name"),
        (_line(objects="person cup"), "objects must be a list of class names"),
        (_line(answer_label=True), "answer_label must be 0-3"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, bad, message):
    path = _write_lines(tmp_path, [_line(), bad], META)
    with pytest.raises(DataFormatError, match=re.escape(message)) as info:
        read_vcr(path)
    assert f"{path}:2" in str(info.value)


class OneImageStore(FeatureStore):
    def __init__(self, regions: Regions):
        self.path, self._index, self.feature_dim, self.regions = Path("memory"), {"a": 0}, regions.features.shape[1], regions

    def _read(self, image_id, location):
        return self.regions


def test_tagged_box_takes_the_feature_of_the_store_region_it_overlaps_most(tmp_path):
    (item,) = read_vcr(_write_lines(tmp_path, [_line()], META))
    detected = Regions(features=np.array([[1.0, 0], [2.0, 0], [3.0, 0]]),
                       boxes=np.array([[0, 0, 4, 4], [5, 5, 9, 10], [0, 0, 10, 10]]), image_w=10, image_h=10)
    regions = item_regions(item, [1, 0], OneImageStore(detected), feature_dim=2, max_regions=36)
    np.testing.assert_array_equal(regions.features[:2, 0], [2.0, 1.0])  # cup -> region 1, person -> region 0
    np.testing.assert_array_equal(regions.boxes[:2], np.array([[5, 5, 10, 10], [0, 0, 5, 5]]))
    assert regions.num_regions == 2 + 3

    ds = VcrDataset([item], WordTokenizer(), store=OneImageStore(detected), max_regions=4)
    batch = collate_choices([ds[0], ds[1]])
    assert batch["input_ids"].shape[:2] == (2, 4) and batch["region_features"].shape == (2, 4, 2)
    assert batch["meta"]["tasks"] == ["Q->A", "QA->R"] and batch["labels"].tolist() == [0, 1]
    assert (batch["token_type_ids"][0, 0] == 1).any()  # the answer is segment 1


def test_an_item_without_features_in_the_store_is_named(tmp_path):
    (item,) = read_vcr(_write_lines(tmp_path, [_line(img_fn="elsewhere.jpg")], META))
    detected = Regions(features=np.ones((1, 2)), boxes=np.array([[0, 0, 4, 4]]), image_w=10, image_h=10)
    with pytest.raises(DataError, match="x.jsonl:1, image id 'elsewhere'"):
        VcrDataset([item], WordTokenizer(), store=OneImageStore(detected))


def test_bad_bytes_and_bad_metadata_name_their_file(tmp_path):
    path = _write_lines(tmp_path, [_line(), _line()], {"boxes": [[0, 0, 5]], "names": ["person"], "width": 10,
                                                          "height": 10})
    with pytest.raises(DataFormatError, match=r"x.jsonl:1: metadata 'a.json': .*a.json: metadata 'boxes' must be"):
        read_vcr(path)
    path.write_bytes(_line().encode() + b"\n" + _line().encode().replace(b"Who", b"Wh\xf6") + b"\n")
    (tmp_path / "vcr1images" / "a.json").write_text(json.dumps(META))
    with pytest.raises(DataFormatError, match=r"x.jsonl:2: not UTF-8 text: byte 0xf6"):
        read_vcr(path)


def test_collecting_problems_keeps_the_good_lines(tmp_path):
    path = _write_lines(tmp_path, [_line(), "{not json", _line(rationale_label=9), _line(annot_id="t-4")], META)
    problems = []
    items = read_vcr(path, problems=problems)
    assert [i.annot_id for i in items] == ["t-1", "t-4"]
    assert [(p.path, p.line) for p in problems] == [(str(path), 2), (str(path), 3)]
