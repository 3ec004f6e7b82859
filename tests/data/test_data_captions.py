"""Caption readers on the real files users bring, and their errors."""

from __future__ import annotations

import json

import pytest
from conftest import shared_path

from interbert.data import Caption, DataFormatError, read_captions
from interbert.data.captions import sniff_caption_format


def test_flickr8k_token_file():
    captions = read_captions(shared_path("data", "flickr8k", "Flickr8k.token.txt"))
    assert len(captions) == 40460
    assert captions[0] == Caption("1000268201_693b08cb0e", "1000268201_693b08cb0e#0",
                                  "A child in a pink dress is climbing up a set of stairs in an entry way .", None)
    assert len({c.image_id for c in captions}) == 8092  # the stray "x.jpg.1" file stays its own image
    assert len({c.caption_id for c in captions}) == len(captions)


def test_coco_val2017_annotations():
    path = shared_path("data", "coco_val2017", "captions_val2017.json")
    assert sniff_caption_format(path) == "coco"
    captions = read_captions(path)
    assert len(captions) == 25014 and len({c.image_id for c in captions}) == 5000
    assert captions[0].image_id == "179765" and captions[0].caption_id == "38"
    assert all(isinstance(c.image_id, str) for c in captions)


def test_karpathy_json_uses_cocoid_when_present():
    coco = read_captions(shared_path("data", "coco_val2017", "DERIVED_dataset_coco_karpathy_test_val_subset_in_val2017.json"))
    assert len({c.image_id for c in coco}) == 1201
    assert coco[0].image_id == "493284" and coco[0].split == "test"
    assert coco[0].text == "A group of adult and young elephants walking."
    # the COCO ids match the official annotation file's ids
    official = {c.image_id for c in read_captions(shared_path("data", "coco_val2017", "captions_val2017.json"))}
    assert {c.image_id for c in coco} <= official

    flickr = read_captions(shared_path("data", "flickr8k", "DERIVED_dataset_flickr8k_test_karpathy_format.json"))
    assert len(flickr) == 5000 and flickr[0].image_id == "1056338697_4f7d7ce270"
    assert {c.split for c in flickr} == {"test"}
    token_ids = {c.image_id for c in read_captions(shared_path("data", "flickr8k", "Flickr8k.token.txt"))}
    assert {c.image_id for c in flickr} <= token_ids


def test_flickr30k_layout_drops_the_image_path_and_takes_split_from_file_name():
    test = read_captions(shared_path("data", "flickr30k", "test.json"))
    assert sniff_caption_format(shared_path("data", "flickr30k", "test.json")) == "flickr30k"
    assert len(test) == 5000 and {c.split for c in test} == {"test"}
    first = [c for c in test if c.image_id == "1016887272"]
    assert len(first) == 5 and not any(c.text.endswith(".jpg") for c in first)
    val = read_captions(shared_path("data", "flickr30k", "validation.json"))
    assert {c.split for c in val} == {"val"} and len({c.image_id for c in val}) == 1000
    fixture = read_captions(shared_path("data", "regions", "DERIVED_flickr30k_captions_for_fixture_images.json"))
    assert len(fixture) == 20 and {c.split for c in fixture} <= {"train", "val", "test"}


def test_coco_cn_token_file_in_chinese():
    captions = read_captions(shared_path("data", "coco_cn", "coco-cn_ext.icap2020.txt"))
    assert len(captions) == 4712
    assert captions[0].image_id == "COCO_val2014_000000217153" and captions[0].text.startswith("一个男人")


def test_jsonl_and_its_errors(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"image_id": 5, "caption": "a dog", "split": "train"}\n{"image_id": "x", "caption": "a cat"}\n')
    assert read_captions(good) == [Caption("5", "5#1", "a dog", "train"), Caption("x", "x#2", "a cat", None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": 5, "caption": "a dog"}\n{"image_id": 6, "caption": "a cat"\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: malformed JSON"):
        read_captions(bad)


def test_malformed_json_document_names_file_and_line(tmp_path):
    bad = tmp_path / "dataset.json"
    bad.write_text('{"images": [\n  {"filename": "a.jpg",\n  "sentences": [}\n]}')
    with pytest.raises(DataFormatError, match=r"dataset.json:3: malformed JSON"):
        read_captions(bad, format="karpathy")


def test_malformed_token_line_names_line(tmp_path):
    bad = tmp_path / "tokens.txt"
    bad.write_text("a.jpg#0\tA dog .\nb.jpg no tab here\n")
    with pytest.raises(DataFormatError, match=r"tokens.txt:2"):
        read_captions(bad, format="flickr8k")


def _karpathy(tmp_path, images, name="dataset.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"images": images}, indent=1))
    return path


@pytest.mark.parametrize(
    "images, message",
    [
        ([{"filename": "a.jpg", "split": "train"}], r"images\[0\] \(id 'a'\): no 'sentences'"),
        ([{"cocoid": 7, "sentences": "a dog"}], r"images\[0\] \(id '7'\): 'sentences' is a string"),
        ([{"cocoid": 7, "sentences": [{"raw": "a"}, {"tokens": ["b"]}]}], r"images\[0\] \(id '7'\): sentences\[1\] has no 'raw'"),
        ([{"cocoid": 7, "sentences": [{"raw": None}]}], r"images\[0\] \(id '7'\): sentences\[0\] 'raw' is null"),
        ([{"sentences": []}], r"images\[0\] has neither 'cocoid' nor 'filename'"),
        ([{"cocoid": 7, "sentences": [{"raw": "a"}]}, {"cocoid": 7, "sentences": [{"raw": "b"}]}],
         r"images\[1\] \(id '7'\): image id '7' is also images\[0\]"),
    ],
)
def test_malformed_karpathy_entries_name_the_image_and_field(tmp_path, images, message):
    # the first image's fault must not read as "unknown caption format": the file is Karpathy's
    path = _karpathy(tmp_path, images)
    with pytest.raises(DataFormatError, match=r"dataset.json: " + message):
        read_captions(path)


def test_collecting_problems_reads_past_every_bad_entry(tmp_path):
    path = _karpathy(tmp_path, [{"cocoid": 1, "sentences": [{"raw": "a"}, {}]}, {"cocoid": 2, "sentences": "b"},
                                {"cocoid": 3, "sentences": [{"raw": "c"}]}])
    problems = []
    captions = read_captions(path, problems=problems)
    assert [c.text for c in captions] == ["a", "c"]
    assert [str(p).split(": ", 1)[1][:14] for p in problems] == ["images[0] (id ", "images[1] (id "]


def test_non_utf8_bytes_name_file_line_and_column(tmp_path):
    doc = tmp_path / "doc.json"
    doc.write_bytes(json.dumps({"images": [{"cocoid": 1, "sentences": [{"raw": "x"}]}]}, indent=1).encode()
                    .replace(b'"x"', b'"caf\xe9"'))
    with pytest.raises(DataFormatError, match=r"doc.json:7: not UTF-8 text: byte 0xe9 at column 17"):
        read_captions(doc)
    lines = tmp_path / "c.jsonl"
    lines.write_bytes(b'{"image_id": 1, "caption": "a"}\n{"image_id": 2, "caption": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"c.jsonl:2: not UTF-8"):
        read_captions(lines)
    tokens = tmp_path / "t.txt"
    tokens.write_bytes(b"a.jpg#0\tA dog\nb.jpg#0\tA caf\xe9\n")
    with pytest.raises(DataFormatError, match=r"t.txt:2: not UTF-8"):
        read_captions(tokens)


def test_truncated_and_empty_files(tmp_path):
    truncated = tmp_path / "cut.json"
    truncated.write_text('{"images": [{"cocoid": 1, "sentences": [{"raw": "a dog"}]},\n {"cocoid": 2, "sentences": [{"raw": "a c')
    with pytest.raises(DataFormatError, match=r"cut.json:2: malformed JSON: .*truncated"):
        read_captions(truncated)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataFormatError, match=r"empty.json: empty file"):
        read_captions(empty)
    no_captions = _karpathy(tmp_path, [], name="none.json")
    with pytest.raises(DataFormatError, match=r"none.json: no captions"):
        read_captions(no_captions)


def _lavis_lists_from_real_coco(folder):
    """LAVIS's two shapes, built from the real COCO val2017 captions: a train file (one caption per entry,
    an ``image_id``) and a test file (a caption list per entry, no ``image_id``, as LAVIS's val/test)."""
    coco = read_captions(shared_path("data", "coco_val2017", "captions_val2017.json"))
    by_image: dict[str, list[str]] = {}
    for c in coco:
        by_image.setdefault(c.image_id, []).append(c.text)
    images = sorted(by_image)[:20]
    train = [{"caption": text, "image": f"val2014/COCO_val2014_{int(i):012d}.jpg", "image_id": f"coco_{i}"}
             for i in images[:10] for text in by_image[i]]
    test = [{"image": f"val2014/COCO_val2014_{int(i):012d}.jpg", "caption": by_image[i]} for i in images[10:]]
    (folder / "coco_karpathy_train.json").write_text(json.dumps(train))
    (folder / "coco_karpathy_test.json").write_text(json.dumps(test, indent=2))
    return by_image, images


def test_lavis_annotation_lists_train_and_test_shapes(tmp_path):
    by_image, images = _lavis_lists_from_real_coco(tmp_path)
    train_path, test_path = tmp_path / "coco_karpathy_train.json", tmp_path / "coco_karpathy_test.json"
    assert sniff_caption_format(train_path) == "lavis" and sniff_caption_format(test_path) == "lavis"

    train = read_captions(train_path)
    assert {c.split for c in train} == {"train"}  # from the file name
    assert [c.image_id for c in train][:1] == [f"coco_{images[0]}"]  # the entry's image_id
    assert len(train) == sum(len(by_image[i]) for i in images[:10])
    assert [c.text for c in train if c.image_id == f"coco_{images[0]}"] == [t.strip() for t in by_image[images[0]]]
    assert len({c.caption_id for c in train}) == len(train)  # numbered per image across its entries

    test = read_captions(test_path)
    assert {c.split for c in test} == {"test"}
    first = f"COCO_val2014_{int(images[10]):012d}"  # no image_id: the image file's stem
    assert [c.text for c in test if c.image_id == first] == [t.strip() for t in by_image[images[10]]]
    assert len({c.image_id for c in test}) == 10


def test_albef_list_and_split_field(tmp_path):
    path = tmp_path / "pretrain_data.json"  # no split in the name: the entry's 'split' decides, else none
    path.write_text(json.dumps([{"image": "/data/vg/1.jpg", "caption": "a man on a horse"},
                                {"image": "/data/vg/2.jpg", "caption": "a red bus", "split": "validation"}]))
    captions = read_captions(path)
    assert [(c.image_id, c.split, c.text) for c in captions] == [("1", None, "a man on a horse"), ("2", "val", "a red bus")]


@pytest.mark.parametrize("entries, message", [
    ([{"image": "a.jpg", "caption": "x"}, 7], r"\[1\] is a number, not an object"),
    ([{"image": "a.jpg", "caption": "x"}, {"caption": "y"}], r"\[1\] has no 'image' and no 'image_id'"),
    ([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": 3}], r"\[1\] \(image 'b'\): 'caption' is a number"),
    ([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": ["ok", None]}], r"\[1\] \(image 'b'\): 'caption' is a list"),
    ([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}], r"\[1\] \(image 'b'\): no 'caption'"),
    ([{"image": "a.jpg", "caption": "x"}, {"image_id": [1], "caption": "y"}], r"\[1\]: 'image_id' is a list"),
])
def test_malformed_annotation_list_entries_name_file_and_index(tmp_path, entries, message):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataFormatError, match=r"ann.json: " + message):
        read_captions(path)
    problems = []  # collected: the good entry is still read
    assert [c.image_id for c in read_captions(path, problems=problems)] == ["a"] and len(problems) == 1
