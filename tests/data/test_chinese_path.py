"""The Chinese path on real captions (COCO-CN): a character-level vocabulary trained from the captions,
and MSM whose whole-word spans (jieba words) never cut a word, through the pretraining dataset."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from conftest import shared_path

from interbert.data.batches import PretrainingDataset
from interbert.data.captions import Caption, read_captions
from interbert.data.features import Regions
from interbert.data.tokenize import encode_caption, train_wordpiece


def _is_cjk(char: str) -> bool:
    return "CJK" in unicodedata.name(char, "")


@pytest.fixture(scope="module")
def zh_captions() -> list[str]:
    return [c.text for c in read_captions(shared_path("data", "coco_cn", "coco-cn_ext.icap2020.txt"))]


@pytest.fixture(scope="module")
def zh_tokenizer(zh_captions, tmp_path_factory):
    return train_wordpiece(zh_captions, tmp_path_factory.mktemp("zh_vocab"), vocab_size=5000, min_frequency=1)


def test_every_chinese_character_is_one_token(zh_captions, zh_tokenizer):
    assert len(zh_captions) == 4712
    for text in zh_captions[:1000]:
        ids = zh_tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens = zh_tokenizer.convert_ids_to_tokens(ids)
        assert zh_tokenizer.unk_token_id not in ids, text  # the vocabulary covers its training captions
        cjk_tokens = [t for t in tokens if any(_is_cjk(c) for c in t.removeprefix("##"))]
        assert all(len(t) == 1 for t in cjk_tokens), (text, tokens)  # no multi-character or ## pieces
        assert "".join(cjk_tokens) == "".join(c for c in text if _is_cjk(c))  # nothing dropped, in order


def test_bilingual_subset_chinese_captions_tokenise_without_unknowns(zh_tokenizer):
    import json

    path = shared_path("data", "coco_cn", "DERIVED_bilingual_zh_en_val2017_subset.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 184
    unknown = sum(zh_tokenizer.unk_token_id in zh_tokenizer(t)["input_ids"] for r in rows for t in r["captions_zh"])
    assert unknown == 0


def test_jieba_word_ids_follow_jieba_segmentation(zh_captions, zh_tokenizer):
    import jieba

    for text in zh_captions[:200]:
        enc = encode_caption(zh_tokenizer, text, max_tokens=128, word_segmenter="jieba")
        tokens = zh_tokenizer.convert_ids_to_tokens(enc.input_ids)
        chars_by_word: dict[int, str] = {}
        for token, word in zip(tokens, enc.word_ids):
            if word is not None:
                chars_by_word[word] = chars_by_word.get(word, "") + token.removeprefix("##")
        words = [w for w in jieba.cut(text) if w.strip()]
        # every token-level word is a jieba word (case and whitespace aside)
        assert all(w.lower() in {x.lower() for x in words} for w in chars_by_word.values()), (text, chars_by_word, words)


class _OneImage:
    """A feature store with the same regions for every image id."""

    path = "memory"
    feature_dim = 8

    def __init__(self, ids):
        self.ids_ = set(ids)

    def __contains__(self, image_id):
        return image_id in self.ids_

    def __getitem__(self, image_id):
        rng = np.random.default_rng(0)
        boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]], np.float32)
        return Regions(rng.standard_normal((3, 8)), boxes, 64, 64)


@pytest.mark.parametrize("msm", ["span", "geometric", "token"])
def test_msm_with_jieba_never_splits_a_word(zh_captions, zh_tokenizer, msm):
    captions = [Caption(str(n // 2), str(n), text) for n, text in enumerate(zh_captions[:120])]
    dataset = PretrainingDataset(captions, _OneImage({c.image_id for c in captions}), zh_tokenizer, max_tokens=48,
                                 msm=msm, word_segmenter="jieba", hard_negatives=None, p_positive=1.0, seed=0)
    multi_character_masked = 0
    for epoch in range(2):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            example = dataset[index]
            enc = encode_caption(zh_tokenizer, captions[index].text, 48, word_segmenter="jieba")
            masked = example["msm_labels"] != -100
            word_ids = np.array([-1 if w is None else w for w in enc.word_ids])
            assert not masked[word_ids == -1].any()  # never [CLS] / [SEP]
            for word in set(word_ids[masked].tolist()):
                assert masked[word_ids == word].all(), (captions[index].text, word)  # the whole word or none of it
                multi_character_masked += int((word_ids == word).sum() > 1)
    assert multi_character_masked > 0  # the spans did cover multi-character words
